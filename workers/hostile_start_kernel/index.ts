// hostile_start_kernel: a module whose WebAssembly start function calls Extism
// kernel functions (extism:host/env input_length, alloc, log_info, ...).
//
// AssemblyScript puts top-level statements in the module's start function (the
// Wasm start section, run while the module is instantiated; build.mjs does not
// pass --exportStart). Extism's kernel expects a call in progress; called from
// the start function it can crash the host process. Deadlift must validate such
// a binary in a subprocess so that only the probe dies.
import { Host, LogLevel } from "@extism/as-pdk";
import { inputBytes, outputBytes } from "../lib/deadlift";

const early = Host.inputString();
Host.log(LogLevel.Info, "hostile_start_kernel: input at start: " + early);
Host.outputString(early);

/** Returns the input unchanged. */
export function ok(): i32 {
  outputBytes(inputBytes());
  return 0;
}
