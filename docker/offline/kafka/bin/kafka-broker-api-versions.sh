#!/bin/sh
# As Kafka's own script: `kafka-broker-api-versions.sh --bootstrap-server HOST:PORT`
KAFKA_HEAP_OPTS="-Xms32m -Xmx128m" KAFKA_JVM_PERFORMANCE_OPTS="-XX:+UseSerialGC -XX:TieredStopAtLevel=1" \
  exec /opt/kafka/bin/java-main org.apache.kafka.tools.BrokerApiVersionsCommand "$@"
