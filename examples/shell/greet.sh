#!/bin/sh
# hello::greet for `iii serve`: the call's payload JSON arrives on stdin, the result goes to
# stdout. Needs nothing but /bin/sh and sed.
#   ./iii serve hello::greet -- sh examples/shell/greet.sh
name=$(sed -n 's/.*"name"[[:space:]]*:[[:space:]]*"\([^"\\]*\)".*/\1/p' | head -n 1)
printf '{"message":"Hello, %s!"}\n' "${name:-world}"
