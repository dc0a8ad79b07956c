// hostile: misbehaving exports for Deadlift's fault-isolation tests.
import {
  fail as failWith, fieldNumber, inputBytes, inputString,
  outputBytes, parseObject,
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
