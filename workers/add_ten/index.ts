// add_ten: {"value": n} -> {"value": n + 10}
import { fail, num, output } from "../lib/deadlift";
import { readValue } from "../lib/value";

function run(): i32 {
  const x = readValue("add_ten");
  if (isNaN(x)) return 1;
  const y = x + 10;
  if (!isFinite(y)) return fail("add_ten: result is not a finite number");
  output('{"value":' + num(y) + "}");
  return 0;
}

export function add_ten(): i32 {
  return run();
}

export function _main(): i32 {
  return run();
}
