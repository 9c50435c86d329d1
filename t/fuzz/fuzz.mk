# Builds the fuzz targets: make -f t/fuzz/fuzz.mk OUT=build/fuzz [TARGETS="json b64url"]
# (scripts/fuzz.sh calls this; run it from the top of the source tree).
# Every lib/*.c is compiled with coverage instrumentation, ASan and UBSan into
# one archive; each t/fuzz/fuzz_<target>.c links against it with libFuzzer's
# main. An archive, so that a harness may #include a lib/ source to reach its
# static functions: that object is then simply not taken from the archive.
OUT ?= build/fuzz
CC := clang
PKGS := apr-1 apr-util-1 libcurl jansson libcrypto
PKG_CFLAGS := $(shell pkg-config --cflags $(PKGS))
PKG_LIBS := $(shell pkg-config --libs $(PKGS))
SAN := -fsanitize=address,undefined -fno-sanitize-recover=undefined
CFLAGS := -g -O1 -fno-omit-frame-pointer $(SAN) -Ilib -It/fuzz $(PKG_CFLAGS) \
          -DMSO_VERSION='"fuzz"' -Wall -Wno-unused-parameter -Wno-unused-function
TARGETS ?= $(patsubst t/fuzz/fuzz_%.c,%,$(filter-out t/fuzz/fuzz_pool_shim.c,$(wildcard t/fuzz/fuzz_*.c)))

LIB_OBJS := $(patsubst lib/%.c,$(OUT)/obj/%.o,$(wildcard lib/*.c))
BINS := $(addprefix $(OUT)/fuzz_,$(TARGETS))

all: $(BINS)

$(OUT)/obj/%.o: lib/%.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -fsanitize=fuzzer-no-link -MMD -MP -c $< -o $@

$(OUT)/libmso_fuzz.a: $(LIB_OBJS)
	rm -f $@
	ar rcs $@ $^

# Not instrumented for coverage: its branches say nothing about lib/.
$(OUT)/obj/fuzz_pool_shim.o: t/fuzz/fuzz_pool_shim.c
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) -MMD -MP -c $< -o $@

$(OUT)/fuzz_%: t/fuzz/fuzz_%.c $(OUT)/libmso_fuzz.a $(OUT)/obj/fuzz_pool_shim.o
	$(CC) $(CFLAGS) -fsanitize=fuzzer -MMD -MP -MF $(OUT)/obj/fuzz_$*.d -MT $@ \
	    $< $(OUT)/obj/fuzz_pool_shim.o $(OUT)/libmso_fuzz.a $(PKG_LIBS) -ldl -lpthread -o $@

.PHONY: all
.SECONDARY:
-include $(wildcard $(OUT)/obj/*.d)
