// filter_even: passes {"value": n} through unchanged when n is an even integer,
// otherwise writes no output (which ends the run).
// only_odd_null: outputs JSON null for even n, the unchanged input otherwise.
import { inputBytes, outputBytes, outputNull } from "../lib/deadlift";
import { readValue } from "../lib/value";

function isEven(x: f64): bool {
  return Math.floor(x) == x && x % 2 == 0;
}

export function filter_even(): i32 {
  const x = readValue("filter_even");
  if (isNaN(x)) return 1;
  if (isEven(x)) outputBytes(inputBytes());
  return 0;
}

export function only_odd_null(): i32 {
  const x = readValue("only_odd_null");
  if (isNaN(x)) return 1;
  if (isEven(x)) outputNull();
  else outputBytes(inputBytes());
  return 0;
}
