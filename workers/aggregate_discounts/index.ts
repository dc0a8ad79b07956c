// aggregate_discounts: Acme's aggregation of Stripe's discount notices.
// Input: the notice {"kind", "issuer", "charge_id", "customer", ...}.
// Host call (namespace "extism:host/user"):
//   kv_incr {"key": str, "by": int} -> {"value": int}   (the new value)
// Increments "discounts.<customer>" and "discounts._total" by 1 and outputs
//   {"customer": str, "discounts": <per-customer count>, "total": <total>}.
import {
  fail, fieldNumber, fieldString, hostRequest, hostResponse, inputString,
  lastError, num, output, parseHostResponse, parseObject, quote,
} from "../lib/deadlift";

@external("extism:host/user", "kv_incr")
declare function kv_incr(offset: u64): u64;

const NAME = "aggregate_discounts";

/** kv_incr(key, by) -> new value, or NaN with the error recorded (caller returns 1). */
function incr(key: string, by: i32): f64 {
  const request = '{"key":' + quote(key) + ',"by":' + by.toString() + "}";
  const response = parseHostResponse(hostResponse(kv_incr(hostRequest(request))), "kv_incr", NAME);
  if (response === null) {
    fail(lastError);
    return NaN;
  }
  const value = fieldNumber(response, "value", NAME + ": kv_incr response", true);
  if (isNaN(value)) fail(lastError);
  return value;
}

export function aggregate_discounts(): i32 {
  const notice = parseObject(inputString(), NAME + ": input");
  if (notice === null) return fail(lastError);
  const customer = fieldString(notice, "customer", NAME);
  if (customer === null) return fail(lastError);

  const perCustomer = incr("discounts." + customer, 1);
  if (isNaN(perCustomer)) return 1;
  const total = incr("discounts._total", 1);
  if (isNaN(total)) return 1;

  output(
    '{"customer":' + quote(customer) +
    ',"discounts":' + num(perCustomer) +
    ',"total":' + num(total) + "}",
  );
  return 0;
}
