// before_charge_action: Acme's module, run by Stripe before a charge.
//
// Input (a charge):
//   {"charge_id": str, "customer": str, "email": str, "amount": number,
//    "category": str, "ts": int (unix seconds)}
// Host calls (namespace "extism:host/user"):
//   past_purchases {"customer": str} -> {"purchases": [{"category": str, "amount": number, "ts": int}, ...]}
//   send_email     {"to": str, "subject": str, "body": str} -> {"id": str}
// A purchase is "similar" when it has the charge's category and
// 0 <= charge.ts - purchase.ts <= 30 days. With >= 10 similar purchases the
// customer is emailed and the module outputs
//   {"charge_id", "customer", "email", "category", "similar_purchases",
//    "discount_percent": 10, "email_id"}
// otherwise it outputs JSON null (ending the run).
import {
  JSON, fail, fieldNumber, fieldString, hostRequest, hostResponse, inputString,
  lastError, logInfo, output, outputNull, parseHostResponse, parseObject, quote,
} from "../lib/deadlift";

@external("extism:host/user", "past_purchases")
declare function past_purchases(offset: u64): u64;

@external("extism:host/user", "send_email")
declare function send_email(offset: u64): u64;

const NAME = "before_charge_action";
const WINDOW_SECONDS: f64 = 30 * 86400;
const THRESHOLD: i32 = 10;
const DISCOUNT_PERCENT: i32 = 10;

export function before_charge_action(): i32 {
  // ---- validate the charge
  const charge = parseObject(inputString(), NAME + ": input");
  if (charge === null) return fail(lastError);
  const chargeId = fieldString(charge, "charge_id", NAME);
  if (chargeId === null) return fail(lastError);
  const customer = fieldString(charge, "customer", NAME);
  if (customer === null) return fail(lastError);
  const email = fieldString(charge, "email", NAME);
  if (email === null) return fail(lastError);
  const amount = fieldNumber(charge, "amount", NAME);
  if (isNaN(amount)) return fail(lastError);
  const category = fieldString(charge, "category", NAME);
  if (category === null) return fail(lastError);
  const ts = fieldNumber(charge, "ts", NAME, true);
  if (isNaN(ts)) return fail(lastError);

  // ---- ask the host for the customer's purchase history
  const historyText = hostResponse(past_purchases(hostRequest('{"customer":' + quote(customer) + "}")));
  const history = parseHostResponse(historyText, "past_purchases", NAME);
  if (history === null) return fail(lastError);
  const purchasesValue = history.get("purchases");
  if (purchasesValue === null || purchasesValue.type != JSON.Types.Array) {
    return fail(NAME + ': past_purchases response must be {"purchases": [...]}');
  }
  const purchases = purchasesValue.get<JSON.Arr>();

  let similar: i32 = 0;
  for (let i = 0; i < purchases.length; i++) {
    const item = purchases.at(i);
    const ctx = NAME + ": past_purchases purchase #" + i.toString();
    if (item.type != JSON.Types.Object) return fail(ctx + " must be an object");
    const purchase = item.get<JSON.Obj>();
    const pCategory = fieldString(purchase, "category", ctx);
    if (pCategory === null) return fail(lastError);
    const pTs = fieldNumber(purchase, "ts", ctx, true);
    if (isNaN(pTs)) return fail(lastError);
    const age = ts - pTs;
    if (pCategory == category && age >= 0 && age <= WINDOW_SECONDS) similar++;
  }

  const summary =
    NAME + ": charge " + chargeId + " customer " + customer + " category " + category +
    ": " + similar.toString() + " similar purchase(s) in the last 30 days";
  if (similar < THRESHOLD) {
    logInfo(summary + " -> no discount (needs " + THRESHOLD.toString() + ")");
    outputNull();
    return 0;
  }

  // ---- loyal customer: send the discount email
  const body =
    "Thank you for your loyalty! You made " + similar.toString() + " " + category +
    " purchases in the last 30 days, so you get a " + DISCOUNT_PERCENT.toString() +
    "% discount on charge " + chargeId + ".";
  const emailRequest =
    '{"to":' + quote(email) +
    ',"subject":' + quote("A loyalty discount for you") +
    ',"body":' + quote(body) + "}";
  const sent = parseHostResponse(hostResponse(send_email(hostRequest(emailRequest))), "send_email", NAME);
  if (sent === null) return fail(lastError);
  const emailId = fieldString(sent, "id", NAME + ": send_email response");
  if (emailId === null) return fail(lastError);

  logInfo(summary + " -> " + DISCOUNT_PERCENT.toString() + "% discount, email " + emailId + " sent to " + email);
  output(
    '{"charge_id":' + quote(chargeId) +
    ',"customer":' + quote(customer) +
    ',"email":' + quote(email) +
    ',"category":' + quote(category) +
    ',"similar_purchases":' + similar.toString() +
    ',"discount_percent":' + DISCOUNT_PERCENT.toString() +
    ',"email_id":' + quote(emailId) + "}",
  );
  return 0;
}
