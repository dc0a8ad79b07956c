// Builds every Deadlift module: <name>/index.ts -> dist/<name>.wasm
//
//   node build.mjs                 # all modules into dist/
//   node build.mjs --out DIR       # all modules into DIR (used by the reproducibility test)
//   node build.mjs add_ten echo    # only the named modules
//
// Builds are deterministic: same sources + same package-lock.json => same bytes.
// Each module is compiled in its own `asc` process (the json-as transform keeps
// module-level state between compilations in one process) with a scrubbed
// environment (json-as reads JSON_* variables that change its code generation)
// and paths relative to this directory (abort messages embed source paths).
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, readFileSync, statSync } from "node:fs";
import { cpus } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = dirname(fileURLToPath(import.meta.url));
const NOT_MODULES = new Set(["lib", "dist", "node_modules"]);

// The compiler flags shared by every module.
export const ASC_FLAGS = [
  "--optimizeLevel", "3",
  "--shrinkLevel", "0",
  "--runtime", "incremental",
  "--use", "abort=lib/abort/deadliftAbort",
  "--transform", "json-as",
  "--disableWarning",
  "--noColors",
];

function parseArgs(argv) {
  let out = join(ROOT, "dist");
  const names = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === "--out") {
      if (i + 1 >= argv.length) throw new Error("--out needs a directory");
      out = resolve(argv[++i]);
    } else if (arg.startsWith("--out=")) {
      out = resolve(arg.slice("--out=".length));
    } else if (arg.startsWith("-")) {
      throw new Error(`unknown option ${arg}`);
    } else {
      names.push(arg);
    }
  }
  return { out, names };
}

function discoverModules() {
  return readdirSync(ROOT)
    .filter((name) => !NOT_MODULES.has(name) && !name.startsWith("."))
    .filter((name) => statSync(join(ROOT, name)).isDirectory())
    .filter((name) => existsSync(join(ROOT, name, "index.ts")))
    .sort();
}

function cleanEnv() {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (key.startsWith("JSON_") || key === "DEBUG" || key === "NODE_OPTIONS") continue;
    env[key] = value;
  }
  return env;
}

function compile(name, outFile) {
  const asc = join(ROOT, "node_modules", "assemblyscript", "bin", "asc.js");
  const args = [asc, `${name}/index.ts`, "--outFile", outFile, ...ASC_FLAGS];
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, args, { cwd: ROOT, env: cleanEnv(), stdio: ["ignore", "pipe", "pipe"] });
    let log = "";
    child.stdout.on("data", (chunk) => (log += chunk));
    child.stderr.on("data", (chunk) => (log += chunk));
    child.on("error", reject);
    child.on("close", (code) => {
      if (code === 0) resolvePromise();
      else reject(new Error(`asc failed for ${name} (exit ${code}):\n${log}`));
    });
  });
}

async function main() {
  const { out, names } = parseArgs(process.argv.slice(2));
  if (!existsSync(join(ROOT, "node_modules", "assemblyscript"))) {
    throw new Error("node_modules missing: run `npm ci` in workers/ first");
  }
  const all = discoverModules();
  for (const name of names) {
    if (!all.includes(name)) throw new Error(`no such module: ${name} (have: ${all.join(", ")})`);
  }
  const modules = names.length ? names : all;
  mkdirSync(out, { recursive: true });

  const started = Date.now();
  const queue = [...modules];
  const jobs = Math.max(1, Math.min(2, cpus().length));
  await Promise.all(
    Array.from({ length: jobs }, async () => {
      while (queue.length) {
        const name = queue.shift();
        await compile(name, join(out, `${name}.wasm`));
      }
    }),
  );

  for (const name of modules) {
    const bytes = readFileSync(join(out, `${name}.wasm`));
    const sha = createHash("sha256").update(bytes).digest("hex");
    console.log(`${sha}  ${String(bytes.length).padStart(7)}  ${name}.wasm`);
  }
  console.log(`built ${modules.length} module(s) into ${out} in ${((Date.now() - started) / 1000).toFixed(1)}s`);
}

main().catch((err) => {
  console.error(err.message ?? err);
  process.exit(1);
});
