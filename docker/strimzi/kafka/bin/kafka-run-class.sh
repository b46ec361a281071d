#!/bin/bash
# Kafka's own bin/kafka-run-class.sh, reduced to what Strimzi's scripts use: java with the
# jars in $KAFKA_HOME/libs and the KAFKA_*_OPTS variables the operator sets (heap, JVM and
# GC options, log4j2, JMX, agents). The archive's scripts are not on Maven Central.
#   kafka-run-class.sh [-daemon] [-name NAME] [-loggc] CLASS ARGS...
set -e
base_dir=$(dirname "$0")/..
KAFKA_HOME=${KAFKA_HOME:-$(cd "$base_dir" && pwd)}
while [[ $# -gt 0 ]]; do
  case $1 in
    -name) shift 2 ;;
    -loggc | -daemon) shift ;;
    *) break ;;
  esac
done
main=$1
shift
if [[ -z ${KAFKA_LOG4J_OPTS:-} && -f $KAFKA_HOME/config/log4j2.properties ]]; then
  KAFKA_LOG4J_OPTS="-Dlog4j2.configurationFile=$KAFKA_HOME/config/log4j2.properties"
fi
# shellcheck disable=SC2086  # the *_OPTS variables are word lists, as in Kafka's scripts
exec java ${KAFKA_HEAP_OPTS:--Xmx256M} \
  ${KAFKA_JVM_PERFORMANCE_OPTS:--server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:MaxInlineLevel=15 -Djava.awt.headless=true} \
  ${KAFKA_GC_LOG_OPTS:-} ${KAFKA_JMX_OPTS:-} ${KAFKA_LOG4J_OPTS:-} ${KAFKA_OPTS:-} \
  -cp "$KAFKA_HOME/libs/*${CLASSPATH:+:$CLASSPATH}" "$main" "$@"
