// emitter: publishes one event per subject through the host.
// Input: {"subjects": [str, ...], "data": <any JSON>}
// Host call (namespace "extism:host/user"):
//   emit {"subject": str, "data": <data>} -> {}   (or {"error": str})
// "data" is passed on as the exact JSON text of the input (never re-serialized,
// so numbers such as 12345678901234567890 or 1.10 keep their spelling).
// Subjects are emitted in order; the first failure stops the module.
// Output: {"emitted": <number of subjects>}.
import {
  fail, fieldStringArray, hostRequest, hostResponse, inputString,
  lastError, output, parseHostResponse, parseObject, quote, rawMember,
} from "../lib/deadlift";

@external("extism:host/user", "emit")
declare function emit(offset: u64): u64;

const NAME = "emitter";

export function emit_many(): i32 {
  const text = inputString();
  const input = parseObject(text, NAME + ": input");
  if (input === null) return fail(lastError);
  const subjects = fieldStringArray(input, "subjects", NAME);
  if (subjects === null) return fail(lastError);
  const data = rawMember(text, "data");
  if (data === null) return fail(NAME + ': missing field "data"');

  const tail = ',"data":' + data + "}";
  for (let i = 0; i < subjects.length; i++) {
    const request = '{"subject":' + quote(subjects[i]) + tail;
    const response = parseHostResponse(hostResponse(emit(hostRequest(request))), "emit", NAME);
    if (response === null) return fail(lastError);
  }
  output('{"emitted":' + subjects.length.toString() + "}");
  return 0;
}
