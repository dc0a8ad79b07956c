// hostile: misbehaving exports for Deadlift's fault-isolation tests.
import { Host, LogLevel, Memory } from "@extism/as-pdk";
import {
  fail as failWith, fieldNumber, inputBytes, inputString,
  output, outputBytes, parseObject,
} from "../lib/deadlift";

let spins: u64 = 0;

/** Loops forever (until the host's timeout interrupts it). */
export function spin(): i32 {
  while (true) {
    spins++;
  }
  return 0;
}

let hoard: Array<Uint8Array> = [];

/** Allocates 1 MiB blocks and keeps them reachable until memory runs out (trap). */
export function bomb(): i32 {
  while (true) {
    const block = new Uint8Array(1 << 20);
    block[0] = 1;
    hoard.push(block);
  }
  return 0;
}

/** Executes `unreachable` (a WebAssembly trap, no error message set). */
export function trap(): i32 {
  unreachable();
  return 0;
}

const HUGE_MAX: f64 = 1073741824.0;

/**
 * {"bytes": N} -> exactly N bytes of output: for N >= 2 a JSON string
 * `"xxx..."`; N == 1 gives `0`; N == 0 gives no output.
 */
export function huge(): i32 {
  const usage = 'huge: input must be {"bytes": integer in [0, 1073741824]}';
  const obj = parseObject(inputString(), "huge: input");
  if (obj === null) return failWith(usage);
  const n = fieldNumber(obj, "bytes", "huge", true);
  if (isNaN(n) || n < 0 || n > HUGE_MAX) return failWith(usage);
  const size = <i32>n;
  if (size == 0) return 0;
  const out = new Uint8Array(size);
  if (size == 1) {
    out[0] = 0x30; // 0
  } else {
    memory.fill(out.dataStart, 0x78 /* x */, <usize>size);
    out[0] = 0x22;
    out[size - 1] = 0x22;
  }
  outputBytes(out);
  return 0;
}

/** Fails with the error "hostile: asked to fail". */
export function fail(): i32 {
  return failWith("hostile: asked to fail");
}

/** Returns the input unchanged. */
export function ok(): i32 {
  outputBytes(inputBytes());
  return 0;
}

/**
 * Logs its input bytes as one info line exactly as given (not decoded): newlines,
 * carriage returns, ANSI escapes, invalid UTF-8 and all. Outputs nothing.
 */
export function say(): i32 {
  Host.logMemory(LogLevel.Info, Memory.allocateBytes(inputBytes()));
  return 0;
}

const FLOOD_MAX_LINES: f64 = 1000000.0;
const FLOOD_MAX_SIZE: f64 = 16777216.0;

/**
 * {"lines": N, "size": S} -> logs N info lines of S bytes each ("xx…x"), then
 * outputs {"logged": N*S}.
 */
export function flood(): i32 {
  const usage = 'flood: input must be {"lines": integer in [0, 1000000], "size": integer in [1, 16777216]}';
  const obj = parseObject(inputString(), "flood: input");
  if (obj === null) return failWith(usage);
  const lines = fieldNumber(obj, "lines", "flood", true);
  const size = fieldNumber(obj, "size", "flood", true);
  if (isNaN(lines) || lines < 0 || lines > FLOOD_MAX_LINES) return failWith(usage);
  if (isNaN(size) || size < 1 || size > FLOOD_MAX_SIZE) return failWith(usage);
  const text = new Uint8Array(<i32>size);
  memory.fill(text.dataStart, 0x78 /* x */, <usize>size);
  const count = <i32>lines;
  for (let i = 0; i < count; i++) {
    // Extism frees a logged block, so each line needs its own copy.
    Host.logMemory(LogLevel.Info, Memory.allocateBytes(text));
  }
  output('{"logged":' + (<i64>lines * <i64>size).toString() + "}");
  return 0;
}

const LOOP_MAX: f64 = 1e15;

/**
 * {"loops": N} -> counts to N, then outputs {"loops": N}: as quick or as slow as
 * asked (a module fast for a while that turns slow).
 */
export function loop(): i32 {
  const usage = 'loop: input must be {"loops": integer in [0, 1e15]}';
  const obj = parseObject(inputString(), "loop: input");
  if (obj === null) return failWith(usage);
  const n = fieldNumber(obj, "loops", "loop", true);
  if (isNaN(n) || n < 0 || n > LOOP_MAX) return failWith(usage);
  const count = <u64>n;
  for (let i: u64 = 0; i < count; i++) {
    spins++;
  }
  output('{"loops":' + count.toString() + "}");
  return 0;
}
