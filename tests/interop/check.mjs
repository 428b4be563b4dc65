// Loads every document a storemesh node exported (GET /api/documents/{id})
// with the JavaScript Automerge, and sums the ledger's stock cells:
// on_hand(product, location) = Σ received ("<product>/<actor>/r")
//                            − Σ removed ("<product>/<actor>/d")
// over every writer and every bucket document `ledger/<location>/<bucket>`.
// Usage: node check.mjs DIR   (DIR/manifest.json lists {id, file})
// Prints one JSON line: {"loaded": N, "stock": {location: {product: on_hand}}}.
import * as A from "@automerge/automerge";
import fs from "node:fs";
import path from "node:path";

const dir = process.argv[2];
const manifest = JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
const stock = {};
let loaded = 0;
for (const { id, file } of manifest) {
  const doc = A.load(new Uint8Array(fs.readFileSync(path.join(dir, file))));
  loaded += 1;
  const m = /^ledger\/([^/]+)\/\d+$/.exec(id);
  if (!m) continue;
  const loc = m[1];
  for (const [key, value] of Object.entries(doc)) {
    const parts = key.split("/");
    if (parts.length !== 3 || (parts[2] !== "r" && parts[2] !== "d")) continue;
    const n = Number(value);
    if (!Number.isSafeInteger(n)) throw new Error(`${id} ${key}: not an integer: ${value}`);
    stock[loc] ??= {};
    stock[loc][parts[0]] = (stock[loc][parts[0]] ?? 0) + (parts[2] === "r" ? n : -n);
  }
}
console.log(JSON.stringify({ loaded, stock }));
