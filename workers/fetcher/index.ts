// fetcher: HTTP through Deadlift's `http_request` host function.
//
// fetch
//   Input: {"url": str, "method"?: str, "headers"?: {name: str}, "body"?: str}
//   Host call (namespace "extism:host/user"):
//     http_request {"method", "url", "headers"?, "body"?}
//       -> {"status": int, "url": str, "headers": {name: str}, "body": str}
//          ("body_base64": str instead of "body" when the body is not UTF-8)
//   Output: the host's response, byte for byte.
//   The host decides what is reachable (the step's allowed_hosts, re-checked on
//   every redirect). A refused or failed request answers {"error": ...}: the
//   module then fails with `fetcher: host function http_request failed: ...`.
//   Non-2xx answers are not errors: they come back with their status and body.
//   "headers" is passed to the host exactly as written; the host checks it.
//
// extism_fetch
//   Input: {"url": str}   Output: {"status": int, "body": str}
//   The same GET through Extism's own HTTP (the kernel's `http_request` and
//   `http_status_code`). Deadlift gives Extism an empty allow-list, so this is
//   always refused (the call traps); it exists to test exactly that.
import { http_request as extism_http_request } from "@extism/as-pdk/lib/env";
import {
  fail, fieldString, hostRequest, hostResponse, inputString, lastError, output,
  parseHostResponse, parseObject, quote, rawMember,
} from "../lib/deadlift";

@external("extism:host/user", "http_request")
declare function http_request(offset: u64): u64;

@external("extism:host/env", "http_status_code")
declare function http_status_code(): i32;

const NAME = "fetcher";

export function fetch(): i32 {
  const text = inputString();
  const input = parseObject(text, NAME + ": input");
  if (input === null) return fail(lastError);
  const url = fieldString(input, "url", NAME);
  if (url === null) return fail(lastError);
  let method = "GET";
  if (input.get("method") !== null) {
    const given = fieldString(input, "method", NAME);
    if (given === null) return fail(lastError);
    method = given;
  }

  let request = '{"method":' + quote(method) + ',"url":' + quote(url);
  const headers = rawMember(text, "headers");
  if (headers !== null) request += ',"headers":' + headers;
  if (input.get("body") !== null) {
    const body = fieldString(input, "body", NAME);
    if (body === null) return fail(lastError);
    request += ',"body":' + quote(body);
  }
  request += "}";

  const response = hostResponse(http_request(hostRequest(request)));
  if (parseHostResponse(response, "http_request", NAME) === null) return fail(lastError);
  output(response);
  return 0;
}

export function extism_fetch(): i32 {
  const input = parseObject(inputString(), NAME + ": input");
  if (input === null) return fail(lastError);
  const url = fieldString(input, "url", NAME);
  if (url === null) return fail(lastError);

  const request = '{"url":' + quote(url) + ',"method":"GET","headers":{}}';
  const body = hostResponse(extism_http_request(hostRequest(request), 0));
  const status = http_status_code();
  output('{"status":' + status.toString() + ',"body":' + quote(body) + "}");
  return 0;
}
