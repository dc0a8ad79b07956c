// hostile_start_loop: a module whose WebAssembly start function never returns.
//
// AssemblyScript puts top-level statements in the module's start function (the
// Wasm start section, run while the module is instantiated, before any export
// can be called; build.mjs does not pass --exportStart). This loop therefore
// hangs instantiation itself: Deadlift must bound it (push-time probe in a
// subprocess, watchdog in the worker).
import { inputBytes, outputBytes } from "../lib/deadlift";

let spins: u64 = 0;
let spinning: bool = true;

while (spinning) {
  spins++;
}

/** Returns the input unchanged (never reached: instantiation never finishes). */
export function ok(): i32 {
  outputBytes(inputBytes());
  return 0;
}
