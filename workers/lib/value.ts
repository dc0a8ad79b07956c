// Shared by the arithmetic/filter modules: read `{"value": number}` input.
import { fail, fieldNumber, parseObject, inputString } from "./deadlift";

/**
 * Parses the call input as `{"value": number}` and returns the number, or NaN
 * after recording the error `<name>: input must be {"value": number}`.
 */
export function readValue(name: string): f64 {
  const obj = parseObject(inputString(), name + ": input");
  let x: f64 = NaN;
  if (obj !== null) x = fieldNumber(obj, "value", name);
  if (isNaN(x)) fail(name + ': input must be {"value": number}');
  return x;
}
