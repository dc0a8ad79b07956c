// Shared helpers for Deadlift modules: input/output, errors, logging, host
// calls and strict JSON handling on top of json-as.
//
// ABI summary (see ../README.md):
//   * input: the event data (JSON by default), read with `inputString()`.
//   * output: `output(json)`; an empty output or JSON `null` ends the run.
//   * errors: `fail(msg)` records the message with Extism's `error_set` and
//     returns 1, which the export returns to the host.
//   * host functions (namespace "extism:host/user", signature (i64) -> i64):
//     argument and result are Extism memory offsets holding UTF-8 JSON.
import "./abort";
import { JSON } from "json-as";
import { Host, LogLevel, Memory } from "@extism/as-pdk";
import { error_set, length } from "@extism/as-pdk/lib/env";

export { JSON };

// ---------------------------------------------------------------- I/O

/** The call input decoded as UTF-8 (invalid sequences become U+FFFD). */
export function inputString(): string {
  return Host.inputString();
}

/** The call input as raw bytes. */
export function inputBytes(): Uint8Array {
  return Host.input();
}

/**
 * Sets the call output to the UTF-8 encoding of `s`.
 * (The PDK's `Host.outputString` uses the UTF-16 length as the byte length and
 * so truncates non-ASCII text; never use it.)
 */
export function output(s: string): void {
  Host.output(Uint8Array.wrap(String.UTF8.encode(s)));
}

/**
 * Sets the call output to `bytes`. `bytes` must start at offset 0 of its
 * buffer (the PDK copies from `bytes.buffer`, ignoring `byteOffset`).
 */
export function outputBytes(bytes: Uint8Array): void {
  if (bytes.length == 0) return; // no output == empty output
  Host.output(bytes);
}

/** Outputs JSON `null`: Deadlift ends the run (filter). */
export function outputNull(): void {
  output("null");
}

/** Records `message` as the call's error; returns 1 for the export to return. */
export function fail(message: string): i32 {
  error_set(Memory.allocateString(message).offset);
  return 1;
}

export function logInfo(message: string): void {
  Host.log(LogLevel.Info, message);
}

// ---------------------------------------------------------------- host calls

/** Copies a string into Extism memory; pass `.offset` to a host function. */
export function hostRequest(json: string): u64 {
  return Memory.allocateString(json).offset;
}

/** Reads the UTF-8 response a host function returned at `offset`. */
export function hostResponse(offset: u64): string {
  if (offset == 0) return "";
  return new Memory(offset, length(offset)).toString();
}

/** Raw bytes of a host function's response at `offset`. */
export function hostResponseBytes(offset: u64): Uint8Array {
  if (offset == 0) return new Uint8Array(0);
  return new Memory(offset, length(offset)).toUint8Array();
}

// ---------------------------------------------------------------- JSON out

/** JSON string literal for `s` (quotes, backslashes, control chars escaped). */
export function quote(s: string): string {
  return JSON.stringify<string>(s);
}

/**
 * JSON number for `x`: integral values print without a fraction ("11"),
 * others in shortest round-trip form. `x` must be finite.
 */
export function num(x: f64): string {
  return JSON.stringify<f64>(x);
}

// ---------------------------------------------------------------- JSON in

/** Message of the last failed `parseObject`/`field*` call. */
export let lastError: string = "";

/**
 * Parses `text` as a JSON object. On failure returns null and sets
 * `lastError` to "<what> is not valid JSON: ..." or "<what> must be a JSON object".
 * The text is checked by a strict validator first, because json-as accepts
 * some malformed documents and aborts (traps) on others.
 */
export function parseObject(text: string, what: string): JSON.Obj | null {
  const syntax = jsonSyntaxError(text);
  if (syntax.length > 0) {
    lastError = what + " is not valid JSON: " + syntax;
    return null;
  }
  const value = JSON.parse<JSON.Value>(text);
  if (value.type != JSON.Types.Object) {
    lastError = what + " must be a JSON object";
    return null;
  }
  return value.get<JSON.Obj>();
}

/** True if `value` holds a JSON number. */
export function isNumber(value: JSON.Value): bool {
  const t = value.type;
  return t >= JSON.Types.U8 && t <= JSON.Types.F64;
}

/** The number in `value` (which must satisfy `isNumber`) as f64. */
export function numberOf(value: JSON.Value): f64 {
  switch (value.type) {
    case JSON.Types.U8: return <f64>value.get<u8>();
    case JSON.Types.U16: return <f64>value.get<u16>();
    case JSON.Types.U32: return <f64>value.get<u32>();
    case JSON.Types.U64: return <f64>value.get<u64>();
    case JSON.Types.I8: return <f64>value.get<i8>();
    case JSON.Types.I16: return <f64>value.get<i16>();
    case JSON.Types.I32: return <f64>value.get<i32>();
    case JSON.Types.I64: return <f64>value.get<i64>();
    case JSON.Types.F32: return <f64>value.get<f32>();
    default: return value.get<f64>();
  }
}

/**
 * String field `key` of `obj`, or null (with `lastError` set to
 * `<ctx>: missing field "key"` / `<ctx>: field "key" must be a string`).
 */
export function fieldString(obj: JSON.Obj, key: string, ctx: string): string | null {
  const value = obj.get(key);
  if (value === null) {
    lastError = ctx + ": missing field " + quote(key);
    return null;
  }
  if (value.type != JSON.Types.String) {
    lastError = ctx + ": field " + quote(key) + " must be a string";
    return null;
  }
  return value.get<string>();
}

/**
 * Finite number field `key` of `obj`, or NaN (with `lastError` set). With
 * `integer`, the number must also be integral.
 */
export function fieldNumber(obj: JSON.Obj, key: string, ctx: string, integer: bool = false): f64 {
  const value = obj.get(key);
  if (value === null) {
    lastError = ctx + ": missing field " + quote(key);
    return NaN;
  }
  const kind = integer ? "an integer" : "a number";
  if (!isNumber(value)) {
    lastError = ctx + ": field " + quote(key) + " must be " + kind;
    return NaN;
  }
  const x = numberOf(value);
  if (!isFinite(x) || (integer && Math.floor(x) != x)) {
    lastError = ctx + ": field " + quote(key) + " must be " + kind;
    return NaN;
  }
  return x;
}

/**
 * Parses a host function response. Returns the object, or null with
 * `lastError` set when it is not a JSON object or is `{"error": ...}`.
 */
export function parseHostResponse(text: string, fn: string, ctx: string): JSON.Obj | null {
  const obj = parseObject(text, ctx + ": response of host function " + fn);
  if (obj === null) return null;
  const e = obj.get("error");
  if (e !== null && e.type != JSON.Types.Null) {
    const detail = e.type == JSON.Types.String ? e.get<string>() : JSON.stringify<JSON.Value>(e);
    lastError = ctx + ": host function " + fn + " failed: " + detail;
    return null;
  }
  return obj;
}

/**
 * String-array field `key` of `obj`: null with `lastError` set to
 * `<ctx>: field "key" must be an array of strings` when it is not one. A missing
 * field (or JSON null) gives `[]` when `optional`, else
 * `<ctx>: missing field "key"`.
 */
export function fieldStringArray(obj: JSON.Obj, key: string, ctx: string, optional: bool = false): string[] | null {
  const value = obj.get(key);
  if (value === null || (optional && value.type == JSON.Types.Null)) {
    if (optional) return [];
    lastError = ctx + ": missing field " + quote(key);
    return null;
  }
  const usage = ctx + ": field " + quote(key) + " must be an array of strings";
  if (value.type != JSON.Types.Array) {
    lastError = usage;
    return null;
  }
  const arr = value.get<JSON.Arr>();
  const out = new Array<string>(0);
  for (let i = 0; i < arr.length; i++) {
    const item = arr.at(i);
    if (item.type != JSON.Types.String) {
      lastError = usage;
      return null;
    }
    out.push(item.get<string>());
  }
  return out;
}

/**
 * The exact source text of member `key` of the JSON object `text` (the last one
 * if the key repeats), or null if the object has no such member. Keys are
 * compared after unescaping. `text` must already have passed `parseObject`
 * (or `jsonSyntaxError`). Lets a module pass a value through byte for byte
 * instead of re-serializing it (json-as would print 1e400 or
 * 12345678901234567890 differently).
 */
export function rawMember(text: string, key: string): string | null {
  const v = new Validator(text);
  v.skipWs();
  if (v.peek() != 0x7b /* { */) return null;
  v.pos++;
  v.skipWs();
  let found: string | null = null;
  while (v.peek() == 0x22 /* " */) {
    const keyStart = v.pos;
    if (!v.string()) return null;
    const name = JSON.parse<string>(text.substring(keyStart, v.pos));
    v.skipWs();
    if (v.peek() != 0x3a /* : */) return null;
    v.pos++;
    v.skipWs();
    const valueStart = v.pos;
    if (!v.value(1)) return null;
    if (name == key) found = text.substring(valueStart, v.pos);
    v.skipWs();
    if (v.peek() != 0x2c /* , */) break;
    v.pos++;
    v.skipWs();
  }
  return found;
}

/** Number of Unicode code points in `s` (a lone surrogate counts as one). */
export function codePoints(s: string): i32 {
  const n = s.length;
  let count = 0;
  for (let i = 0; i < n; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xd800 && c <= 0xdbff && i + 1 < n) {
      const d = s.charCodeAt(i + 1);
      if (d >= 0xdc00 && d <= 0xdfff) i++;
    }
    count++;
  }
  return count;
}

// ---------------------------------------------------------------- validator

const MAX_DEPTH = 128;

/** "" if `text` is one valid JSON value (RFC 8259), else a short reason. */
export function jsonSyntaxError(text: string): string {
  const v = new Validator(text);
  v.skipWs();
  if (v.pos >= v.end) return "empty input";
  if (!v.value(0)) return v.error;
  v.skipWs();
  if (v.pos < v.end) return "unexpected data after the value at offset " + v.pos.toString();
  return "";
}

class Validator {
  text: string;
  pos: i32 = 0;
  end: i32;
  error: string = "";

  constructor(text: string) {
    this.text = text;
    this.end = text.length;
  }

  @inline peek(): i32 {
    return this.pos < this.end ? <i32>this.text.charCodeAt(this.pos) : -1;
  }

  fail(what: string): bool {
    this.error = what + " at offset " + this.pos.toString();
    return false;
  }

  skipWs(): void {
    while (this.pos < this.end) {
      const c = this.text.charCodeAt(this.pos);
      if (c != 0x20 && c != 0x09 && c != 0x0a && c != 0x0d) break;
      this.pos++;
    }
  }

  value(depth: i32): bool {
    const c = this.peek();
    if (c == 0x7b /* { */) return this.object(depth + 1);
    if (c == 0x5b /* [ */) return this.array(depth + 1);
    if (c == 0x22 /* " */) return this.string();
    if (c == 0x2d /* - */ || (c >= 0x30 && c <= 0x39)) return this.number();
    if (c == 0x74 /* t */) return this.literal("true");
    if (c == 0x66 /* f */) return this.literal("false");
    if (c == 0x6e /* n */) return this.literal("null");
    if (c < 0) return this.fail("unexpected end of input");
    return this.fail("unexpected character");
  }

  literal(word: string): bool {
    const n = word.length;
    if (this.pos + n > this.end || this.text.substr(this.pos, n) != word) {
      return this.fail("invalid literal");
    }
    this.pos += n;
    return true;
  }

  object(depth: i32): bool {
    if (depth > MAX_DEPTH) return this.fail("nesting too deep");
    this.pos++; // {
    this.skipWs();
    if (this.peek() == 0x7d /* } */) {
      this.pos++;
      return true;
    }
    while (true) {
      if (this.peek() != 0x22) return this.fail("expected a string key");
      if (!this.string()) return false;
      this.skipWs();
      if (this.peek() != 0x3a /* : */) return this.fail("expected ':'");
      this.pos++;
      this.skipWs();
      if (!this.value(depth)) return false;
      this.skipWs();
      const c = this.peek();
      if (c == 0x2c /* , */) {
        this.pos++;
        this.skipWs();
        continue;
      }
      if (c == 0x7d /* } */) {
        this.pos++;
        return true;
      }
      return this.fail("expected ',' or '}'");
    }
  }

  array(depth: i32): bool {
    if (depth > MAX_DEPTH) return this.fail("nesting too deep");
    this.pos++; // [
    this.skipWs();
    if (this.peek() == 0x5d /* ] */) {
      this.pos++;
      return true;
    }
    while (true) {
      if (!this.value(depth)) return false;
      this.skipWs();
      const c = this.peek();
      if (c == 0x2c /* , */) {
        this.pos++;
        this.skipWs();
        continue;
      }
      if (c == 0x5d /* ] */) {
        this.pos++;
        return true;
      }
      return this.fail("expected ',' or ']'");
    }
  }

  string(): bool {
    this.pos++; // opening quote
    while (this.pos < this.end) {
      const c = this.text.charCodeAt(this.pos);
      if (c == 0x22) {
        this.pos++;
        return true;
      }
      if (c < 0x20) return this.fail("control character in string");
      if (c == 0x5c /* \ */) {
        this.pos++;
        const e = this.peek();
        if (e == 0x75 /* u */) {
          for (let k = 1; k <= 4; k++) {
            const h = this.pos + k < this.end ? this.text.charCodeAt(this.pos + k) : -1;
            const hex = (h >= 0x30 && h <= 0x39) || (h >= 0x41 && h <= 0x46) || (h >= 0x61 && h <= 0x66);
            if (!hex) return this.fail("invalid \\u escape");
          }
          this.pos += 5;
          continue;
        }
        if (
          e != 0x22 && e != 0x5c && e != 0x2f && e != 0x62 &&
          e != 0x66 && e != 0x6e && e != 0x72 && e != 0x74
        ) {
          return this.fail("invalid escape");
        }
      }
      this.pos++;
    }
    return this.fail("unterminated string");
  }

  digits(): i32 {
    const start = this.pos;
    while (this.pos < this.end) {
      const c = this.text.charCodeAt(this.pos);
      if (c < 0x30 || c > 0x39) break;
      this.pos++;
    }
    return this.pos - start;
  }

  number(): bool {
    if (this.peek() == 0x2d) this.pos++;
    const first = this.peek();
    if (first == 0x30) {
      this.pos++;
    } else if (first >= 0x31 && first <= 0x39) {
      this.digits();
    } else {
      return this.fail("invalid number");
    }
    if (this.peek() == 0x2e /* . */) {
      this.pos++;
      if (this.digits() == 0) return this.fail("invalid number");
    }
    const e = this.peek();
    if (e == 0x65 || e == 0x45) {
      this.pos++;
      const s = this.peek();
      if (s == 0x2b || s == 0x2d) this.pos++;
      if (this.digits() == 0) return this.fail("invalid number");
    }
    return true;
  }
}
