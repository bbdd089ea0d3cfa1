#!/usr/bin/env bash
# Apache Kafka (KRaft, single node) from the official Maven Central artifacts.
#   kafka.sh fetch   copy the broker jars into infra/kafka/lib (mvn; skipped when present)
#   kafka.sh start   format storage on first run, start on 127.0.0.1:$KAFKA_PORT, wait until it answers
#   kafka.sh stop    stop the broker by PID (SIGTERM, then SIGKILL after a grace period)
#   kafka.sh status  exit 0 when the broker answers
# Environment: KAFKA_PORT (default 9092), POSTBUS_STATE (default <repo>/.state), KAFKA_HEAP (default 384m),
# KAFKA_JVM_OPTS (default -XX:TieredStopAtLevel=1: C1 only; on 2 cores the C2 compiler's work was most of the
# broker's CPU per message for the first ~25,000 messages, see bench/README.md).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${POSTBUS_STATE:-$repo/.state}"
port="${KAFKA_PORT:-9092}"
ctl_port="${KAFKA_CONTROLLER_PORT:-$((port + 1))}"
heap="${KAFKA_HEAP:-384m}"
jvm_opts="${KAFKA_JVM_OPTS--XX:TieredStopAtLevel=1}"
dir="$state/kafka"
pidfile="$dir/kafka.pid"
lib="$here/lib"

log() { echo "[kafka] $*" >&2; }

fetch() {
  if [ -f "$lib/.complete" ] && [ "$lib/.complete" -nt "$here/pom.xml" ]; then return 0; fi
  log "fetching Apache Kafka jars from Maven Central (mvn)"
  rm -rf "$lib"
  (cd "$here" && mvn -q -B -ntp package)
  touch "$lib/.complete"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

java_run() {
  # shellcheck disable=SC2086
  java -Xms64m -Xmx"$heap" -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto \
    -Djava.awt.headless=true -Dkafka.logs.dir="$dir/logs" \
    -Dlog4j2.configurationFile="$here/log4j2.xml" -cp "$lib/*" "$@"
}

write_config() {
  mkdir -p "$dir/data" "$dir/logs"
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$ctl_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$ctl_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=4
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
num.network.threads=2
num.io.threads=4
log.retention.hours=-1
PROPS
}

format() {
  if [ -f "$dir/data/meta.properties" ]; then return 0; fi
  local cluster_id
  cluster_id="$(java_run kafka.tools.StorageTool random-uuid | tail -n1)"
  log "formatting KRaft storage in $dir/data (cluster $cluster_id)"
  java_run kafka.tools.StorageTool format -t "$cluster_id" -c "$dir/server.properties" >"$dir/logs/format.log" 2>&1 \
    || { cat "$dir/logs/format.log" >&2; exit 1; }
}

start() {
  fetch
  if running; then log "already running (pid $(cat "$pidfile"))"; return 0; fi
  if port_open "$port"; then log "port $port is taken by another process"; exit 1; fi
  write_config
  format
  log "starting broker on 127.0.0.1:$port (heap $heap, logs $dir/logs)"
  nohup bash -c "exec java -Xms64m -Xmx$heap -XX:+UseSerialGC $jvm_opts -Djava.awt.headless=true \
    -Dkafka.logs.dir='$dir/logs' -Dlog4j2.configurationFile='$here/log4j2.xml' \
    -cp '$lib/*' kafka.Kafka '$dir/server.properties'" >"$dir/logs/stdout.log" 2>&1 &
  echo $! >"$pidfile"
  wait_ready
}

wait_ready() {
  local deadline=$((SECONDS + ${KAFKA_START_TIMEOUT:-90}))
  until port_open "$port"; do
    if ! running; then log "broker exited; last log lines:"; tail -n 30 "$dir/logs/stdout.log" "$dir/logs/server.log" >&2 || true; exit 1; fi
    if [ $SECONDS -ge $deadline ]; then log "broker did not answer within timeout"; exit 1; fi
    sleep 0.5
  done
  # The port opens before the broker has registered with the controller; wait for that line.
  until grep -q "Kafka Server started\|\[KafkaRaftServer nodeId=1\] Kafka Server started" "$dir/logs/server.log" 2>/dev/null; do
    if [ $SECONDS -ge $deadline ]; then log "broker did not finish starting within timeout"; exit 1; fi
    sleep 0.5
  done
  log "ready (pid $(cat "$pidfile"))"
}

stop() {
  if ! running; then rm -f "$pidfile"; return 0; fi
  local pid; pid="$(cat "$pidfile")"
  log "stopping pid $pid"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -0 "$pid" 2>/dev/null && { log "still alive after 30 s, SIGKILL"; kill -KILL "$pid" || true; }
  rm -f "$pidfile"
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  status) port_open "$port" ;;
  *) echo "usage: $0 fetch|start|stop|status" >&2; exit 2 ;;
esac
