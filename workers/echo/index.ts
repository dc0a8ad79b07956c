// echo / _main: output = input, byte for byte (works for any codec).
// upper: {"text": s} -> {"text": s.toUpperCase()} (full Unicode case mapping).
// count: ignores its input; outputs {"calls": n}, n = calls of `count` this
//   instance has served (a module-level global: shows whether an instance, and
//   so its state, is reused between calls).
import { fail, fieldString, inputBytes, inputString, output, outputBytes, parseObject, quote } from "../lib/deadlift";

export function echo(): i32 {
  outputBytes(inputBytes());
  return 0;
}

export function _main(): i32 {
  outputBytes(inputBytes());
  return 0;
}

export function upper(): i32 {
  const usage = 'upper: input must be {"text": string}';
  const obj = parseObject(inputString(), "upper: input");
  if (obj === null) return fail(usage);
  const text = fieldString(obj, "text", "upper");
  if (text === null) return fail(usage);
  output('{"text":' + quote(text.toUpperCase()) + "}");
  return 0;
}

let calls: i32 = 0;

export function count(): i32 {
  calls++;
  output('{"calls":' + calls.toString() + "}");
  return 0;
}
