;; Asks for 64 MiB more memory than it starts with.
(module
  (memory (export "memory") 1)
  (func (export "_start") (drop (memory.grow (i32.const 1024)))))
