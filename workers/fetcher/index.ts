// fetcher: one HTTP GET through Extism's HTTP support.
// Input: {"url": str}
// Output: {"status": int, "body": str}   (body decoded as UTF-8, invalid bytes -> U+FFFD)
//
// @extism/as-pdk 1.0.0 has no HTTP wrapper (no `Http` class; `lib/env.ts`
// declares `http_request` but not `http_status_code`), so this calls the
// kernel functions directly:
//   http_request(req, body) -> offset: `req` holds {"url", "method", "headers"}
//     as JSON, `body` is 0 (no request body); the result holds the response
//     body (0 when there is none).
//   http_status_code() -> i32: the status of the last request.
// The host checks the URL's host against the manifest's `allowed_hosts`; a
// refused request traps, so the call fails with Extism's message
// ("HTTP request to <url> is not allowed"). Non-2xx responses are not errors:
// they come back with their status and body.
import { http_request } from "@extism/as-pdk/lib/env";
import { fail, fieldString, hostRequest, hostResponse, inputString, lastError, output, parseObject, quote } from "../lib/deadlift";

@external("extism:host/env", "http_status_code")
declare function http_status_code(): i32;

const NAME = "fetcher";

export function fetch(): i32 {
  const input = parseObject(inputString(), NAME + ": input");
  if (input === null) return fail(lastError);
  const url = fieldString(input, "url", NAME);
  if (url === null) return fail(lastError);

  const request = '{"url":' + quote(url) + ',"method":"GET","headers":{}}';
  const body = hostResponse(http_request(hostRequest(request), 0));
  const status = http_status_code();
  output('{"status":' + status.toString() + ',"body":' + quote(body) + "}");
  return 0;
}
