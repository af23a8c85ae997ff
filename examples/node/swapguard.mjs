// swapguard.mjs: talk to the swapguard supervisor from a Node.js or TypeScript host.
//
// Standard library only; copy this file into your project. Every call goes to the control
// socket that swapguard hands the host as SWAPGUARD_SOCKET: HTTP/1.1 + JSON over a unix
// stream socket. That is the preferred path in Node, because Node's `dgram` module has no
// unix datagram sockets and so cannot speak to NOTIFY_SOCKET directly. `notify()` is for code
// written against systemd's notify protocol: it spawns `swapguard notify` when that command is
// on PATH (which also works under plain systemd), else it sends the same thing over HTTP.
//
// Every failure rejects with a `SwapguardError` that carries the server's error `code` and the
// HTTP `status` (null when there was no answer at all, with code "not_reachable").
//
// Types are JSDoc, so TypeScript checks callers when `allowJs` is on.

import { spawn } from 'node:child_process';
import http from 'node:http';

const DEFAULT_TIMEOUT_MS = 10_000;
/** Swap actions may wait on swapguard's runtime for up to 60 s (a confirm: the data flush). */
const ACTION_TIMEOUT_MS = 65_000;

/** A refusal or failure of swapguard, or no answer from it. */
export class SwapguardError extends Error {
  /**
   * @param {string} message
   * @param {string} code  the server's error code ("conflict", "not_found", ...) or our own
   * @param {number | null} status  the HTTP status, or null when there was no HTTP answer
   */
  constructor(message, code, status) {
    super(message);
    this.name = 'SwapguardError';
    this.code = code;
    this.status = status;
  }
}

/**
 * @typedef {object} RequestOptions
 * @property {string} [socketPath]  default: process.env.SWAPGUARD_SOCKET
 * @property {number} [timeoutMs]   default: 10 s (swap actions: 65 s)
 */

/**
 * One request to the control socket; resolves to the parsed JSON answer.
 * @param {string} method
 * @param {string} path
 * @param {object | undefined} [body]
 * @param {RequestOptions} [options]
 * @returns {Promise<any>}
 */
export function request(method, path, body, options = {}) {
  const socketPath = options.socketPath ?? process.env.SWAPGUARD_SOCKET;
  const timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  if (!socketPath) {
    return Promise.reject(
      new SwapguardError('SWAPGUARD_SOCKET is not set: not running under swapguard?', 'no_socket', null),
    );
  }
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  /** @type {Record<string, string | number>} */
  const headers = { Accept: 'application/json' };
  if (payload !== undefined) {
    headers['Content-Type'] = 'application/json';
    headers['Content-Length'] = payload.length;
  }
  return new Promise((resolve, reject) => {
    // agent: false is one connection per call, so an idle keep-alive connection that the
    // server has closed can never swallow a heartbeat.
    const req = http.request(
      { socketPath, method, path, headers, agent: false, host: 'swapguard', timeout: timeoutMs },
      (res) => {
        /** @type {Buffer[]} */
        const chunks = [];
        res.on('data', (chunk) => chunks.push(chunk));
        res.on('error', (err) => reject(unreachable(socketPath, err)));
        res.on('end', () => {
          const text = Buffer.concat(chunks).toString('utf8');
          const status = res.statusCode ?? 0;
          if (status >= 400) {
            reject(serverError(status, text));
            return;
          }
          if (!(res.headers['content-type'] ?? '').startsWith('application/json')) {
            resolve(text);
            return;
          }
          try {
            resolve(JSON.parse(text));
          } catch {
            reject(new SwapguardError(`unreadable answer to ${method} ${path}`, 'bad_answer', status));
          }
        });
      },
    );
    req.on('timeout', () => {
      req.destroy(new SwapguardError(
        `swapguard at ${socketPath} did not answer within ${timeoutMs} ms`, 'not_reachable', null));
    });
    req.on('error', (err) => reject(unreachable(socketPath, err)));
    req.end(payload);
  });
}

/**
 * @param {string} socketPath
 * @param {Error} err
 */
function unreachable(socketPath, err) {
  if (err instanceof SwapguardError) return err;
  const error = new SwapguardError(
    `cannot reach swapguard at ${socketPath}: ${err.message}`, 'not_reachable', null);
  error.cause = err;
  return error;
}

/**
 * The server's `{"error": {"code", "message"}}`, as an Error; any other body becomes the message.
 * @param {number} status
 * @param {string} text
 */
function serverError(status, text) {
  try {
    const { code, message } = JSON.parse(text).error;
    if (typeof code === 'string' && typeof message === 'string') {
      return new SwapguardError(message, code, status);
    }
  } catch {
    // not the API's error shape: fall through
  }
  return new SwapguardError(text.trim() || `HTTP ${status}`, `http_${status}`, status);
}

/**
 * @param {string} swapId
 * @param {string} action
 * @param {RequestOptions} [options]
 */
function swapAction(swapId, action, options) {
  if (typeof swapId !== 'string' || swapId === '') {
    return Promise.reject(new SwapguardError(
      `${action} needs a swap id (SWAPGUARD_SWAP_ID is set only on probation)`, 'bad_request', null));
  }
  const path = `/v1/swaps/${encodeURIComponent(swapId)}/${action}`;
  return request('POST', path, undefined, { timeoutMs: ACTION_TIMEOUT_MS, ...options });
}

/**
 * Tell swapguard the host is ready (READY=1), optionally with a status text.
 * @param {string} [status]
 * @param {RequestOptions} [options]
 * @returns {Promise<{ok: boolean}>}
 */
export function ready(status, options) {
  return request('POST', '/v1/heartbeat', status === undefined ? { ready: true } : { ready: true, status }, options);
}

/**
 * A heartbeat (WATCHDOG=1), optionally with a status text shown in `swapguard status`.
 * @param {string} [status]
 * @param {RequestOptions} [options]
 * @returns {Promise<{ok: boolean}>}
 */
export function heartbeat(status, options) {
  return request('POST', '/v1/heartbeat', status === undefined ? {} : { status }, options);
}

/**
 * Keep the new version: ends probation. Rejects with code "conflict" (409) once rolled back.
 * @param {string} [swapId]  default: this process's SWAPGUARD_SWAP_ID
 * @param {RequestOptions} [options]
 * @returns {Promise<any>} the swap
 */
export function confirm(swapId = onProbation()?.swapId ?? '', options = undefined) {
  return swapAction(swapId, 'confirm', options);
}

/**
 * Push the deadline by the configured `deadman.extend_by`, never past the hard cap.
 * @param {string} [swapId]  default: this process's SWAPGUARD_SWAP_ID
 * @param {RequestOptions} [options]
 * @returns {Promise<any>} the swap, with its new deadline_at
 */
export function extend(swapId = onProbation()?.swapId ?? '', options = undefined) {
  return swapAction(swapId, 'extend', options);
}

/**
 * GET /v1/status: supervisor, host, current swap, code.
 * @param {RequestOptions} [options]
 * @returns {Promise<any>}
 */
export function status(options) {
  return request('GET', '/v1/status', undefined, options);
}

/**
 * This process runs a new version on probation: the swap id and the deadline; else null.
 * @returns {{swapId: string, deadline: Date} | null}
 */
export function onProbation() {
  const swapId = process.env.SWAPGUARD_SWAP_ID;
  if (!swapId) return null;
  return { swapId, deadline: new Date(process.env.SWAPGUARD_DEADLINE ?? NaN) };
}

/**
 * This is the first run after a rollback: the swap that was rolled back and why; else null.
 * @returns {{swapId: string, reason: string} | null}
 */
export function rolledBack() {
  const swapId = process.env.SWAPGUARD_ROLLED_BACK;
  if (!swapId) return null;
  return { swapId, reason: process.env.SWAPGUARD_ROLLBACK_REASON ?? '' };
}

/**
 * How often to heartbeat, in ms: half of WATCHDOG_USEC, as systemd advises; null when no
 * heartbeat is due (unset, or WATCHDOG_PID names another process).
 * @returns {number | null}
 */
export function watchdogIntervalMs() {
  const usec = Number(process.env.WATCHDOG_USEC ?? '');
  const pid = process.env.WATCHDOG_PID;
  if (!Number.isInteger(usec) || usec <= 0) return null;
  if (pid !== undefined && Number(pid) !== process.pid) return null;
  return usec / 1000 / 2;
}

/**
 * Send a systemd notify state ("READY=1\nSTATUS=up", "WATCHDOG=1", "X_SWAPGUARD_CONFIRM=<id>",
 * "EXTEND_TIMEOUT_USEC=<n>"). Spawns `swapguard notify` when it is on PATH, else uses HTTP.
 * Keys with no equivalent here (STOPPING, MAINPID, ...) reject with code "bad_request".
 * Resolves to the path taken: "swapguard-notify" or "http".
 * @param {string} state
 * @param {RequestOptions} [options]
 * @returns {Promise<'swapguard-notify' | 'http'>}
 */
export async function notify(state, options) {
  const said = parseState(state);
  const viaCommand = said.ready || said.heartbeat || said.status !== undefined || said.confirm !== undefined;
  let via = /** @type {'swapguard-notify' | 'http'} */ ('http');
  if (viaCommand) {
    via = (await runNotifyCommand(said, options)) ? 'swapguard-notify' : 'http';
    if (via === 'http') {
      if (said.ready) await ready(said.status, options);
      else if (said.heartbeat || said.status !== undefined) await heartbeat(said.status, options);
      if (said.confirm !== undefined) await confirm(said.confirm, options);
    }
  }
  // `swapguard notify` has no option for an extension, and over HTTP an extension asks for
  // deadman.extend_by: EXTEND_TIMEOUT_USEC's value counts only on the notify socket.
  if (said.extend) await extend(undefined, options);
  return via;
}

/**
 * @typedef {object} NotifyState
 * @property {boolean} ready
 * @property {boolean} heartbeat
 * @property {boolean} extend
 * @property {string} [status]
 * @property {string} [confirm]
 */

/**
 * @param {string} state
 * @returns {NotifyState}
 */
function parseState(state) {
  /** @type {NotifyState} */
  const said = { ready: false, heartbeat: false, extend: false };
  const bad = (/** @type {string} */ why) => new SwapguardError(`notify: ${why}`, 'bad_request', null);
  for (const line of String(state).split('\n')) {
    if (line === '') continue;
    const at = line.indexOf('=');
    if (at <= 0) throw bad(`expected KEY=VALUE, got ${JSON.stringify(line)}`);
    const key = line.slice(0, at);
    const value = line.slice(at + 1);
    if (key === 'READY') said.ready = value === '1';
    else if (key === 'WATCHDOG' && value === '1') said.heartbeat = true;
    else if (key === 'STATUS') said.status = value;
    else if (key === 'X_SWAPGUARD_CONFIRM' && value !== '') said.confirm = value;
    else if (key === 'EXTEND_TIMEOUT_USEC' && /^[0-9]+$/.test(value)) said.extend = true;
    else throw bad(`${line.slice(0, 60)} cannot be sent from Node (no unix datagram sockets)`);
  }
  if (!said.ready && !said.heartbeat && !said.extend && said.status === undefined && said.confirm === undefined) {
    throw bad('nothing to say');
  }
  return said;
}

/**
 * Run `swapguard notify ...`; false when the command is not on PATH.
 * @param {NotifyState} said
 * @param {RequestOptions} [options]
 * @returns {Promise<boolean>}
 */
function runNotifyCommand(said, options = {}) {
  const args = ['notify'];
  if (said.ready) args.push('--ready');
  if (said.heartbeat) args.push('--heartbeat');
  if (said.status !== undefined) args.push('--status', said.status);
  if (said.confirm !== undefined) args.push('--confirm', said.confirm);
  const env = options.socketPath ? { ...process.env, SWAPGUARD_SOCKET: options.socketPath } : process.env;
  return new Promise((resolve, reject) => {
    const child = spawn('swapguard', args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
    // Our own timer, not spawn's `timeout`: that one outlives a spawn that failed (ENOENT) and
    // keeps the process alive until it fires.
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? DEFAULT_TIMEOUT_MS);
    let stderr = '';
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (text) => { stderr += text; });
    child.on('error', (err) => {
      clearTimeout(timer);
      if (/** @type {NodeJS.ErrnoException} */ (err).code === 'ENOENT') resolve(false);
      else reject(new SwapguardError(`swapguard notify: ${err.message}`, 'notify_failed', null));
    });
    child.on('close', (exitCode, signal) => {
      clearTimeout(timer);
      if (exitCode === 0) {
        resolve(true);
        return;
      }
      const how = signal ? `killed by ${signal}` : `exit ${exitCode}`;
      // exit 3 is the CLI's "supervisor not reachable"
      const code = exitCode === 3 ? 'not_reachable' : 'notify_failed';
      reject(new SwapguardError(`swapguard notify (${how}): ${stderr.trim()}`, code, null));
    });
  });
}
