# iii - one C file. `make` builds ./iii; `make small` the embedded profile (./iii-small);
# `make test` runs ./test.sh; `make bench` runs the benchmarks.
CC      ?= cc
CFLAGS  ?= -std=c99 -O2 -Wall -Wextra -Wpedantic
LDFLAGS ?=

iii: iii.c iii.h
	$(CC) $(CFLAGS) iii.c -o $@ $(LDFLAGS)

# the embedded profile: -Os, smaller read buffer and limits (iii.h, III_SMALL), no unwind
# tables (C needs none; about 29 KB of the binary), stripped
small: iii.c iii.h
	$(CC) -std=c99 -Os -DIII_SMALL -fno-asynchronous-unwind-tables iii.c -o iii-small $(LDFLAGS)
	strip iii-small 2>/dev/null || true

test: iii
	./test.sh

bench: iii
	sh bench/run.sh

clean:
	rm -rf iii iii-small build bench/bench

.PHONY: test bench clean small
