// host.mjs: a small Node.js host under swapguard, using only the standard library and the helper.
//
// It reads `app.json` beside it (its "code"):
//   {"version": "v2", "confirm": true, "via": "http" | "notify"}
// - reports ready, then heartbeats every second (or at half of WATCHDOG_USEC) with a status text;
// - on probation (SWAPGUARD_SWAP_ID set) with "confirm": true, confirms its own swap once ready;
// - "via": "notify" says all of that through `notify()` (systemd-style states) instead of the
//   HTTP calls;
// - appends what it was told at start (probation, rollback) to `host.log`, one JSON line per start;
// - exits 0 on SIGTERM.

import { appendFileSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

import * as swapguard from './swapguard.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const app = JSON.parse(readFileSync(join(here, 'app.json'), 'utf8'));
const version = String(app.version ?? 'v1');
const viaNotify = app.via === 'notify';
const probation = swapguard.onProbation();
const rolledBack = swapguard.rolledBack();

function record(fields) {
  const line = { version, pid: process.pid, probation, rolledBack, ...fields };
  appendFileSync(join(here, 'host.log'), `${JSON.stringify(line)}\n`);
}

let beats = 0;
let timer;
process.on('SIGTERM', () => {
  clearInterval(timer);
  process.exit(0);
});

async function beat() {
  beats += 1;
  const text = `node host ${version}: ${beats} beats`;
  try {
    if (viaNotify) await swapguard.notify(`WATCHDOG=1\nSTATUS=${text}`);
    else await swapguard.heartbeat(text);
  } catch (err) {
    console.error(`heartbeat failed: ${err.code}: ${err.message}`);
  }
}

async function main() {
  record({ event: 'start' });
  const text = `node host ${version}: up`;
  if (viaNotify) await swapguard.notify(`READY=1\nSTATUS=${text}`);
  else await swapguard.ready(text);
  if (probation && app.confirm) {
    let via = 'http';
    if (viaNotify) via = await swapguard.notify(`X_SWAPGUARD_CONFIRM=${probation.swapId}`);
    else await swapguard.confirm(probation.swapId);
    record({ event: 'confirmed', swapId: probation.swapId, via });
  }
  const every = Math.min(1000, swapguard.watchdogIntervalMs() ?? 1000);
  timer = setInterval(beat, every);
}

main().catch((err) => {
  console.error(`node host ${version} failed: ${err.code ?? ''} ${err.message}`);
  process.exit(1);
});
