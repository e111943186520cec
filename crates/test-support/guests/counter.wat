;; Counts its calls in a global and in memory and replies with both counts: a fresh instance
;; per call answers "11" every time; any state carried over shows as a larger digit.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (data (i32.const 100) "{\"specversion\":\"1.0\",\"id\":\"c\",\"source\":\"/counter\",\"type\":\"count\",\"data\":\"00\"}")
  (func (export "_start")
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.store8 (i32.const 50) (i32.add (i32.load8_u (i32.const 50)) (i32.const 1)))
    ;; the two digits of "data" sit at 100 + 73 and 100 + 74
    (i32.store8 (i32.const 173) (i32.add (i32.const 48) (global.get $calls)))
    (i32.store8 (i32.const 174) (i32.add (i32.const 48) (i32.load8_u (i32.const 50))))
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 77))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
