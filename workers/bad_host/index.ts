// bad_host: a module that abuses a host function (kept apart from `hostile`
// so that module needs no host functions at all).
import { Memory } from "@extism/as-pdk";
import { hostResponseBytes, outputBytes } from "../lib/deadlift";

@external("extism:host/user", "send_email")
declare function send_email(offset: u64): u64;

/** Calls send_email with bytes that are not JSON (nor valid UTF-8); outputs the raw response. */
export function bad_host_call(): i32 {
  const garbage = new Uint8Array(12);
  const bytes: u8[] = [0xff, 0xfe, 0x00, 0x7b, 0x7b, 0x6e, 0x6f, 0x74, 0x20, 0x6a, 0x73, 0x6f];
  for (let i = 0; i < bytes.length; i++) garbage[i] = bytes[i];
  const offset = send_email(Memory.allocateBytes(garbage).offset);
  outputBytes(hostResponseBytes(offset));
  return 0;
}
