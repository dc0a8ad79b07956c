// settings_reader: reads configuration values and secrets through the host.
// Input: {"config": [key, ...], "secrets": [key, ...]}   (a missing or null list = [])
// Host calls (namespace "extism:host/user"):
//   config_get {"key": str} -> {"value": str | null}
//   secret_get {"key": str} -> {"value": str | null}
// Output: {"config": {key: value | null, ...},
//          "secret_lengths": {key: <code points in the secret> | null, ...}}
// A secret's value is never output, logged or put in an error message: only
// its length leaves the module. Keys keep their input order; a repeated key is
// looked up once.
import {
  JSON, codePoints, fail, fieldStringArray, hostRequest, hostResponse, inputString,
  lastError, output, parseHostResponse, parseObject, quote,
} from "../lib/deadlift";

@external("extism:host/user", "config_get")
declare function host_config_get(offset: u64): u64;

@external("extism:host/user", "secret_get")
declare function host_secret_get(offset: u64): u64;

const NAME = "settings_reader";

/** Set by `lookup` when the host answered {"value": null} (or the call failed). */
let missing: bool = false;
/** Set by `lookup` when the call failed (error already recorded). */
let failed: bool = false;

/** Asks host function `fn` for `key`; returns the value ("" if null/failed, see the flags). */
function lookup(fn: string, key: string): string {
  missing = true;
  failed = true;
  const request = hostRequest('{"key":' + quote(key) + "}");
  const offset = fn == "config_get" ? host_config_get(request) : host_secret_get(request);
  const response = parseHostResponse(hostResponse(offset), fn, NAME);
  if (response === null) {
    fail(lastError);
    return "";
  }
  const value = response.get("value");
  if (value !== null && value.type == JSON.Types.String) {
    missing = false;
    failed = false;
    return value.get<string>();
  }
  if (value !== null && value.type == JSON.Types.Null) {
    failed = false;
    return "";
  }
  fail(NAME + ": " + fn + ' response must be {"value": string or null}');
  return "";
}

function seen(keys: string[], upTo: i32, key: string): bool {
  for (let j = 0; j < upTo; j++) if (keys[j] == key) return true;
  return false;
}

export function read(): i32 {
  const input = parseObject(inputString(), NAME + ": input");
  if (input === null) return fail(lastError);
  const configKeys = fieldStringArray(input, "config", NAME, true);
  if (configKeys === null) return fail(lastError);
  const secretKeys = fieldStringArray(input, "secrets", NAME, true);
  if (secretKeys === null) return fail(lastError);

  let config = "";
  for (let i = 0; i < configKeys.length; i++) {
    const key = configKeys[i];
    if (seen(configKeys, i, key)) continue;
    const value = lookup("config_get", key);
    if (failed) return 1;
    if (config.length > 0) config += ",";
    config += quote(key) + ":" + (missing ? "null" : quote(value));
  }

  let lengths = "";
  for (let i = 0; i < secretKeys.length; i++) {
    const key = secretKeys[i];
    if (seen(secretKeys, i, key)) continue;
    const secret = lookup("secret_get", key);
    if (failed) return 1;
    if (lengths.length > 0) lengths += ",";
    lengths += quote(key) + ":" + (missing ? "null" : codePoints(secret).toString());
  }

  output('{"config":{' + config + '},"secret_lengths":{' + lengths + "}}");
  return 0;
}
