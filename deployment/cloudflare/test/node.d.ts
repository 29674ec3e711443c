// The few parts of Node's API the tests use (no @types/node: one dependency less to pin).

declare module "node:test" {
  export interface TestOptions {
    skip?: string | boolean;
  }
  export function test(name: string, fn: () => void | Promise<void>): void;
  export function test(name: string, options: TestOptions, fn: () => void | Promise<void>): void;
}

declare module "node:assert/strict" {
  function assert(value: unknown, message?: string): asserts value;
  namespace assert {
    function equal(actual: unknown, expected: unknown, message?: string): void;
    function deepEqual(actual: unknown, expected: unknown, message?: string): void;
    function throws(fn: () => unknown, check: (error: unknown) => boolean, message?: string): void;
    function ok(value: unknown, message?: string): asserts value;
    function fail(message?: string): never;
    function match(value: string, pattern: RegExp, message?: string): void;
    function doesNotMatch(value: string, pattern: RegExp, message?: string): void;
    function rejects(promise: Promise<unknown>, error: new (...args: never[]) => Error, message?: string): Promise<void>;
  }
  export = assert;
}

declare module "node:fs" {
  export function readFileSync(path: string, encoding: "utf8"): string;
}

declare module "node:path" {
  export function join(...parts: string[]): string;
}

declare const process: { env: Record<string, string | undefined> };
declare const __dirname: string;
