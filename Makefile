# iii - one C file. `make` builds ./iii; `make test` runs ./test.sh; `make bench` runs the benchmarks.
CC      ?= cc
CFLAGS  ?= -std=c99 -O2 -Wall -Wextra -Wpedantic
LDFLAGS ?=

iii: iii.c iii.h
	$(CC) $(CFLAGS) iii.c -o $@ $(LDFLAGS)

test: iii
	./test.sh

bench: iii
	sh bench/run.sh

clean:
	rm -rf iii build bench/bench

.PHONY: test bench clean
