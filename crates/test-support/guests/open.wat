;; Tries to open /etc/passwd through the first preopened directory (fd 3) and reports the
;; errno as an error: a sandbox without a filesystem answers 8 (EBADF, no such descriptor).
(module
  (import "wasi_snapshot_preview1" "path_open"
    (func $path_open (param i32 i32 i32 i32 i32 i64 i64 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "/etc/passwd")
  (data (i32.const 200) "{\"error\":{\"code\":\"function_error\",\"message\":\"open failed with errno 00\"}}")
  (data (i32.const 400) "{\"events\":[]}")
  (func (export "_start")
    (local $errno i32)
    (local.set $errno
      (call $path_open (i32.const 3) (i32.const 0) (i32.const 100) (i32.const 11)
        (i32.const 0) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 50)))
    (if (i32.eqz (local.get $errno))
      (then
        (i32.store (i32.const 0) (i32.const 400))
        (i32.store (i32.const 4) (i32.const 13)))
      (else
        ;; two decimal digits at 200 + 68 and 200 + 69
        (i32.store8 (i32.const 268) (i32.add (i32.const 48) (i32.div_u (local.get $errno) (i32.const 10))))
        (i32.store8 (i32.const 269) (i32.add (i32.const 48) (i32.rem_u (local.get $errno) (i32.const 10))))
        (i32.store (i32.const 0) (i32.const 200))
        (i32.store (i32.const 4) (i32.const 73))))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
