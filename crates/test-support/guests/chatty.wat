;; Writes 20 lines on stderr, one write each, and replies with no events.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "chatty line\n")
  (func (export "_start")
    (local $i i32)
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 12))
    (block $done
      (loop $again
        (br_if $done (i32.ge_u (local.get $i) (i32.const 20)))
        (drop (call $fd_write (i32.const 2) (i32.const 0) (i32.const 1) (i32.const 8)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $again)))))
