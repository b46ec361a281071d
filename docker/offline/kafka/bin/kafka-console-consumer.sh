#!/bin/sh
# As Kafka's own script: `kafka-console-consumer.sh --bootstrap-server HOST:PORT --topic T …`
KAFKA_HEAP_OPTS="-Xms32m -Xmx256m" KAFKA_JVM_PERFORMANCE_OPTS="-XX:+UseSerialGC -XX:TieredStopAtLevel=1" \
  exec /opt/kafka/bin/java-main org.apache.kafka.tools.consumer.ConsoleConsumer "$@"
