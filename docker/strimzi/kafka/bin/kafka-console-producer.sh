#!/bin/bash
# As Kafka's bin/kafka-console-producer.sh (a small heap: a command-line tool).
export KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx256M}
export KAFKA_JVM_PERFORMANCE_OPTS="-XX:+UseSerialGC -XX:TieredStopAtLevel=1"
exec "$(dirname "$0")/kafka-run-class.sh" org.apache.kafka.tools.ConsoleProducer "$@"
