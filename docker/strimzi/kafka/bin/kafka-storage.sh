#!/bin/bash
# As Kafka's bin/kafka-storage.sh (kafka_run.sh formats the KRaft storage with it).
exec "$(dirname "$0")/kafka-run-class.sh" kafka.tools.StorageTool "$@"
