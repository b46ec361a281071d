#!/bin/bash
# As Kafka's bin/kafka-server-start.sh: the broker (or controller) with a 1 GB heap unless
# KAFKA_HEAP_OPTS says otherwise (Strimzi sets it from the resources).
export KAFKA_HEAP_OPTS=${KAFKA_HEAP_OPTS:--Xmx1G -Xms1G}
exec "$(dirname "$0")/kafka-run-class.sh" kafka.Kafka "$@"
