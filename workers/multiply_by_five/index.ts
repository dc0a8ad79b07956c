// multiply_by_five: {"value": n} -> {"value": n * 5}
import { fail, num, output } from "../lib/deadlift";
import { readValue } from "../lib/value";

export function multiply_by_five(): i32 {
  const x = readValue("multiply_by_five");
  if (isNaN(x)) return 1;
  const y = x * 5;
  if (!isFinite(y)) return fail("multiply_by_five: result is not a finite number");
  output('{"value":' + num(y) + "}");
  return 0;
}
