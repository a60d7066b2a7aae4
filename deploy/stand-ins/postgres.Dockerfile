# A local stand-in for postgres:16 from Debian's PostgreSQL: the same POSTGRES_USER/PASSWORD/DB variables,
# data in /var/lib/postgresql/data, pg_isready for the health check.
ARG BASE_IMAGE=goldsmith-base/debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/lib/postgresql/data /var/run/postgresql && chown -R postgres:postgres /var/lib/postgresql /var/run/postgresql \
    && printf '%s\n' '#!/bin/bash' 'set -e' 'export PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data' \
        'if [ ! -s "$PGDATA/PG_VERSION" ]; then' \
        '  pw=$(mktemp); echo "$POSTGRES_PASSWORD" > "$pw"' \
        '  initdb -U "$POSTGRES_USER" --pwfile="$pw" -A scram-sha-256 >/dev/null; rm "$pw"' \
        '  echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"' \
        '  pg_ctl -w -o "-c listen_addresses=" start >/dev/null' \
        '  PGPASSWORD="$POSTGRES_PASSWORD" psql -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""' \
        '  pg_ctl -w stop >/dev/null' \
        'fi' \
        'exec postgres -c listen_addresses="*"' > /usr/local/bin/postgres-entrypoint \
    && chmod 755 /usr/local/bin/postgres-entrypoint && ln -s /usr/lib/postgresql/15/bin/pg_isready /usr/local/bin/
USER postgres
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
