{{/*
Helpers of the gozon chart: PostgreSQL: the bundled databases' names and passwords, the URLs.
Every name is prefixed `gozon.` (Helm shares template names across a chart and its
subcharts); each says what it returns and how to call it. The helpers are split by topic
over the `_*.tpl` files of this folder.
*/}}

{{/*
gozon.dbName -- the name of a bundled database's StatefulSet, Service and Secret
(`<fullname>-orders-db`, `<fullname>-payments-db`: the spec's orders-db and payments-db).
Usage: {{ include "gozon.dbName" (dict "ctx" $ "service" "orders") }}
*/}}
{{- define "gozon.dbName" -}}
{{- printf "%s-%s-db" (include "gozon.fullname" .ctx) .service }}
{{- end }}

{{/*
gozon.dbDatabase -- the database name of a service, as the spec has it.
Usage: {{ include "gozon.dbDatabase" "orders" }}
*/}}
{{- define "gozon.dbDatabase" -}}
{{- ternary "order_db" "account_db" (eq . "orders") }}
{{- end }}

{{/*
gozon.dbPassword -- a bundled database's password: the one in its existing Secret (so upgrades
keep it), else a new random one. Each call without an existing Secret draws a new password:
call it once per render (secret.yaml does) and pass the result on.
Usage: {{ $password := include "gozon.dbPassword" (dict "ctx" $ "service" "orders") }}
*/}}
{{- define "gozon.dbPassword" -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace (include "gozon.dbName" .) }}
{{- if and $existing $existing.data (hasKey $existing.data "password") }}
{{- index $existing.data "password" | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/*
gozon.databaseUrl -- GOZON_ORDERS_DATABASE_URL or GOZON_PAYMENTS_DATABASE_URL: the bundled
database's (with the `password` given) or postgresql.external.<service>'s (password URL-escaped).
Usage: {{ include "gozon.databaseUrl" (dict "ctx" $ "service" "orders" "password" $password) }}
*/}}
{{- define "gozon.databaseUrl" -}}
{{- $pg := .ctx.Values.postgresql }}
{{- if eq $pg.mode "bundled" }}
{{- printf "postgresql+asyncpg://%s:%s@%s:5432/%s" $pg.bundled.user .password (include "gozon.dbName" .) (include "gozon.dbDatabase" .service) }}
{{- else }}
{{- $db := get $pg.external .service }}
{{- $host := required (printf "postgresql.external.%s.host is required when postgresql.mode is external (or set existingSecret)" .service) $db.host }}
{{- $password := required (printf "postgresql.external.%s.password is required when postgresql.mode is external and existingSecret is empty" .service) $db.password }}
{{- $url := printf "postgresql+asyncpg://%s:%s@%s:%d/%s" (urlquery $db.user) (urlquery $password) $host (int $db.port) $db.database }}
{{- if $db.params }}{{ $url = printf "%s?%s" $url $db.params }}{{ end }}
{{- $url }}
{{- end }}
{{- end }}
