;; Replies with one event whose data is its environment, entries separated by "|", and writes
;; the same entries on stderr (the function's logs).
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $sizes (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 100) "{\"specversion\":\"1.0\",\"id\":\"e\",\"source\":\"/env\",\"type\":\"env\",\"data\":\"")
  (data (i32.const 180) "\"}")
  (func (export "_start")
    (local $size i32) (local $i i32)
    (drop (call $sizes (i32.const 16) (i32.const 20)))
    (local.set $size (i32.load (i32.const 20)))
    ;; pointers at 1024, strings at 8192
    (drop (call $environ (i32.const 1024) (i32.const 8192)))
    (block $done
      (loop $scan
        (br_if $done (i32.ge_u (local.get $i) (local.get $size)))
        (if (i32.eqz (i32.load8_u (i32.add (i32.const 8192) (local.get $i))))
          (then (i32.store8 (i32.add (i32.const 8192) (local.get $i)) (i32.const 124))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $scan)))
    ;; three writes (a WASI write may take only its first buffer): prefix, entries, suffix
    (call $write (i32.const 1) (i32.const 100) (i32.const 67))
    (call $write (i32.const 1) (i32.const 8192) (local.get $size))
    (call $write (i32.const 1) (i32.const 180) (i32.const 2))
    (call $write (i32.const 2) (i32.const 8192) (local.get $size)))
  (func $write (param $fd i32) (param $at i32) (param $len i32)
    (i32.store (i32.const 0) (local.get $at))
    (i32.store (i32.const 4) (local.get $len))
    (drop (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 40)))))
