// Abort handler for every Deadlift module (wired in by `--use abort=lib/abort/deadliftAbort`).
//
// AssemblyScript calls `abort` for `throw`, failed assertions, out-of-bounds
// accesses and json-as parse failures. The default handler imports `env.abort`,
// which an Extism host does not provide, so we replace it: record the message
// with the Extism error mechanism (`error_set`) and trap. The host then reports
// the call as failed with this message.
import { error_set } from "@extism/as-pdk/lib/env";
import { Memory } from "@extism/as-pdk";

let aborting = false;

export function deadliftAbort(
  message: string | null,
  fileName: string | null,
  lineNumber: u32,
  columnNumber: u32,
): void {
  // A second abort while reporting the first one (e.g. allocation failure):
  // give up on the message and just trap.
  if (aborting) unreachable();
  aborting = true;
  let text = "abort: " + (message === null ? "(no message)" : changetype<string>(message));
  if (fileName !== null) {
    text +=
      " at " + changetype<string>(fileName) + ":" + lineNumber.toString() + ":" + columnNumber.toString();
  }
  error_set(Memory.allocateString(text).offset);
  unreachable();
}
