// discount_notice: Stripe's step after before_charge_action.
// Input: the discount object {"charge_id", "customer", "email", "category",
//   "similar_purchases", "discount_percent", "email_id"}.
// Output: {"kind": "loyalty_discount", "issuer": "stripe", "charge_id",
//   "customer", "email", "discount_percent", "similar_purchases"}.
import {
  fail, fieldNumber, fieldString, inputString, lastError, num, output, parseObject, quote,
} from "../lib/deadlift";

const NAME = "discount_notice";

export function discount_notice(): i32 {
  const obj = parseObject(inputString(), NAME + ": input");
  if (obj === null) return fail(lastError);
  const chargeId = fieldString(obj, "charge_id", NAME);
  if (chargeId === null) return fail(lastError);
  const customer = fieldString(obj, "customer", NAME);
  if (customer === null) return fail(lastError);
  const email = fieldString(obj, "email", NAME);
  if (email === null) return fail(lastError);
  const percent = fieldNumber(obj, "discount_percent", NAME);
  if (isNaN(percent)) return fail(lastError);
  const similar = fieldNumber(obj, "similar_purchases", NAME, true);
  if (isNaN(similar)) return fail(lastError);

  output(
    '{"kind":"loyalty_discount","issuer":"stripe"' +
    ',"charge_id":' + quote(chargeId) +
    ',"customer":' + quote(customer) +
    ',"email":' + quote(email) +
    ',"discount_percent":' + num(percent) +
    ',"similar_purchases":' + num(similar) + "}",
  );
  return 0;
}
