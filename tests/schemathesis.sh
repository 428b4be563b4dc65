#!/usr/bin/env bash
# Checks that openapi.yaml tells the truth: Schemathesis (pip install
# schemathesis) generates requests from the schema against a real node and
# checks every answer against it (all checks: no 5xx, status codes and bodies
# as documented, valid requests accepted, invalid ones refused).
#
#   tests/schemathesis.sh [MAX_EXAMPLES]      # default 30 per operation
#
# Exit status: Schemathesis's (0 = no failure). The streaming endpoint
# (/api/inventory/stream, text/event-stream) is left out: a fuzzer cannot read
# an open stream. Needs `schemathesis` on PATH and builds the node (debug).
set -euo pipefail
cd "$(dirname "$0")/.."
max_examples="${1:-30}"
command -v schemathesis >/dev/null || { echo "schemathesis not found (pip install schemathesis)" >&2; exit 2; }

cargo build -q -p storemesh-node
bin="${CARGO_TARGET_DIR:-target}/debug/storemesh"
work="$(mktemp -d)"
node_pid=""
cleanup() {
  if [ -n "$node_pid" ]; then kill "$node_pid" 2>/dev/null || true; wait "$node_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
http_port="$(free_port)"
quic_port="$(free_port)"
token="schemathesis-admin-token-0123456789"
"$bin" init --data-dir "$work/node" --name store-1 --http-addr "127.0.0.1:$http_port" \
  --quic-addr "127.0.0.1:$quic_port" --api-token "$token" >/dev/null
RUST_LOG=error "$bin" run --data-dir "$work/node" </dev/null &
node_pid=$!
base="http://127.0.0.1:$http_port"
for _ in $(seq 1 200); do
  curl -fsS "$base/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done

# Some data, so that reads find products, sales and customers.
auth=(-H "Authorization: Bearer $token" -H "Content-Type: application/json")
curl -fsS "${auth[@]}" -X POST "$base/api/receipts" \
  -d '{"receipt_id":"seed-r1","location":"store-1","lines":[{"product_id":1,"quantity":1000},{"product_id":2,"quantity":1000}]}' >/dev/null
curl -fsS "${auth[@]}" -X PUT "$base/api/products/1" -d '{"sku":"SKU-1","barcodes":["4006381333931"]}' >/dev/null
curl -fsS "${auth[@]}" -X PUT "$base/api/customers/c-1" -d '{"name":"Ada","email":"ada@example.org"}' >/dev/null
curl -fsS "${auth[@]}" -X POST "$base/api/sales" \
  -d '{"sale_id":"seed-s1","customer_id":"c-1","lines":[{"product_id":1,"quantity":1}]}' >/dev/null

NO_COLOR=1 schemathesis --config-file tests/schemathesis.toml run openapi.yaml \
  --url "$base" \
  -H "Authorization: Bearer $token" \
  --max-examples "$max_examples" \
  --request-timeout 10 \
  --exclude-path /api/inventory/stream \
  --seed "${SCHEMATHESIS_SEED:-19}"
