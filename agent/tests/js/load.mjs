// Load an Automerge document (a `lichen export --format automerge` file) with the reference
// JavaScript implementation and print its content as JSON, keys sorted. Lichen stores strings
// as scalar strings (last writer wins, not character merges), which the JavaScript library
// reads as `ImmutableString` objects: printed here as the strings they hold.
// Usage: node load.mjs FILE
import { readFileSync } from "node:fs";
import * as Automerge from "@automerge/automerge";

const bytes = readFileSync(process.argv[2]);
const doc = Automerge.load(new Uint8Array(bytes));
const sorted = (v) => {
  if (Automerge.isImmutableString(v)) return v.toString();
  if (Array.isArray(v)) return v.map(sorted);
  if (v !== null && typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v).sort()) out[k] = sorted(v[k]);
    return out;
  }
  return v;
};
process.stdout.write(JSON.stringify(sorted(Automerge.toJS(doc))) + "\n");
