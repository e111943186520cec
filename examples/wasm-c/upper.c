/*
 * The C example: a WebAssembly function (WASI preview 1) that upper-cases text, like the Go
 * plugin example. The event arrives on stdin as CloudEvents JSON; the reply goes to stdout;
 * what it writes on stderr reaches the function's logs (`mycelium logs NAME`).
 *
 * Build offline with Debian's clang, lld, wasi-libc and libclang-rt-14-dev-wasm32:
 *   clang --target=wasm32-wasi --sysroot=/usr -O2 -o upper.wasm upper.c
 * Deploy and call:
 *   mycelium deploy upper upper.wasm
 *   mycelium invoke upper --type com.example.upper --content-type text/plain --data 'hello'
 *
 * The JSON handling is the least an example needs (the first "key" wins, which is an
 * attribute in what the runtime sends); a real function would use a JSON library.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Reads all of stdin; NULL when memory runs out (the instance's --memory-mb). */
static char *read_all(size_t *len) {
    size_t cap = 4096, n = 0, got;
    char *buf = malloc(cap + 1);
    while (buf && (got = fread(buf + n, 1, cap - n, stdin)) > 0) {
        n += got;
        if (n == cap) {
            char *grown = realloc(buf, 2 * cap + 1);
            if (!grown) {
                free(buf);
                return NULL;
            }
            buf = grown;
            cap *= 2;
        }
    }
    if (buf) {
        buf[n] = '\0';
        *len = n;
    }
    return buf;
}

/* The opening quote of the string value of "key", or NULL. */
static const char *string_value(const char *json, const char *key) {
    char pattern[64];
    snprintf(pattern, sizeof pattern, "\"%s\"", key);
    const char *at = strstr(json, pattern);
    if (!at) return NULL;
    at += strlen(pattern);
    while (*at == ' ' || *at == '\t' || *at == '\n' || *at == '\r' || *at == ':') at++;
    return *at == '"' ? at : NULL;
}

/* The length of the JSON string at `quote`, between its quotes, escapes as written. */
static size_t string_length(const char *quote) {
    size_t i = 1;
    while (quote[i] && quote[i] != '"') i += quote[i] == '\\' && quote[i + 1] ? 2 : 1;
    return i - 1;
}

static int reply_error(const char *code, const char *message) {
    printf("{\"error\":{\"code\":\"%s\",\"message\":\"%s\"}}\n", code, message);
    return 0;
}

int main(void) {
    size_t len;
    char *event = read_all(&len);
    if (!event) return reply_error("function_error", "the event does not fit in memory");
    const char *type = string_value(event, "type");
    if (!type || strncmp(type, "\"com.example.upper\"", 19) != 0) {
        fwrite(event, 1, len, stdout); /* any other event is echoed */
        return 0;
    }
    const char *id = string_value(event, "id");
    const char *data = string_value(event, "data");
    if (!id || !data) return reply_error("invalid_event", "send text data");
    size_t n = string_length(data);
    const char *function = getenv("MYCELIUM_FUNCTION");
    fprintf(stderr, "upper-casing %zu bytes\n", n);
    printf("{\"specversion\":\"1.0\",\"id\":\"upper-%.*s\",\"source\":\"mycelium/%s\","
           "\"type\":\"com.example.upper.result\",\"datacontenttype\":\"text/plain\",\"data\":\"",
           (int)string_length(id), id + 1, function ? function : "upper");
    for (size_t i = 1; i <= n; i++) {
        if (data[i] == '\\') { /* an escape stays as it is: \n must not become \N */
            putchar(data[i++]);
            putchar(data[i]);
        } else {
            putchar(toupper((unsigned char)data[i]));
        }
    }
    printf("\"}\n");
    return 0;
}
