#!/bin/sh
# The gozon chart's backup (templates/backup.yaml's CronJob runs it in the PostgreSQL image).
#
# Dumps one database, named by libpq's variables (PGHOST, PGPORT, PGUSER, PGPASSWORD,
# PGDATABASE), with pg_dump's custom format: one consistent snapshot of that database (pg_dump
# reads it in a single repeatable-read transaction; writers are not blocked). The dump is
# written as a hidden .partial file, read back with `pg_restore --list`, then renamed to
#   $BACKUP_DIR/$PGDATABASE/$PGDATABASE-<UTC time>.dump
# so a file with that name is always a whole, readable archive. Then only the newest
# $BACKUP_KEEP dumps of that database are kept. Exit status: pg_dump's, or 1.
#
# The CronJob dumps account_db first, then order_db (docs/operations.md, "Backups"): a debit
# in the account_db dump then always has its order in the later order_db dump.
set -eu

: "${PGDATABASE:?PGDATABASE names the database to dump}"
: "${BACKUP_DIR:?BACKUP_DIR is the folder the dumps go to}"
keep="${BACKUP_KEEP:-7}"
case "$keep" in '' | *[!0-9]* | 0) echo "BACKUP_KEEP must be a positive number" >&2; exit 1 ;; esac

dir="$BACKUP_DIR/$PGDATABASE"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
final="$dir/$PGDATABASE-$stamp.dump"
partial="$dir/.$PGDATABASE-$stamp.dump.partial"
mkdir -p "$dir"
trap 'rm -f "$partial"' EXIT

# A new pod's first connection can come before its network is ready for it (a NetworkPolicy
# enforcer adds the pod to its database's allowed peers a moment after the pod starts): wait,
# up to BACKUP_CONNECT_WAIT_S, until the server accepts connections.
wait_s="${BACKUP_CONNECT_WAIT_S:-60}"
waited=0
until pg_isready --quiet; do
  if [ "$waited" -ge "$wait_s" ]; then
    echo "backup: ${PGHOST:-localhost}:${PGPORT:-5432} not accepting connections after $wait_s s" >&2
    exit 1
  fi
  sleep 1
  waited=$((waited + 1))
done

pg_dump --format=custom --compress=6 --no-password --file="$partial"
pg_restore --list "$partial" > /dev/null
mv "$partial" "$final"
echo "backup: $PGDATABASE -> $final ($(wc -c < "$final") bytes)"

# The newest $keep by name (the UTC time sorts), the rest removed.
ls "$dir" | grep -E "^$PGDATABASE-[0-9]{8}T[0-9]{6}Z\.dump\$" | sort -r | tail -n "+$((keep + 1))" |
  while read -r old; do
    rm -f "$dir/$old"
    echo "backup: removed $dir/$old (BACKUP_KEEP=$keep)"
  done
