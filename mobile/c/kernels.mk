# mobile/c/kernels.mk — the INT4 x INT8 kernels (engineer B): sources, per-file SIMD flags, kernel test + bench.
#
# Included by mobile/c/Makefile (engine build):  include kernels.mk
#   objects: $(MMOE_KERNEL_SRCS); compile each with  $(MMOE_KFLAGS_$(notdir $<))  added to the usual CFLAGS.
#   Only the SIMD files get SIMD flags: everything else must stay baseline (x86-64 / armv8-a), because runtime
#   detection (cpu_features.c) is what keeps a static ARM binary from executing dotprod/i8mm on a Cortex-A53.
# Standalone (tests/test_mobile_kernels.py):
#   make -f kernels.mk kernel-test  [KCC=aarch64-linux-gnu-gcc KSTATIC=1] [KBUILD=dir]
#   make -f kernels.mk kernel-bench
MMOE_KDIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))

MMOE_KERNEL_SRCS := fp16.c kernels_scalar.c cpu_features.c kernels_avx2.c kernels_neon.c kernels_dotprod.c \
                    kernels_i8mm.c
MMOE_KERNEL_HDRS := kernels.h kernels_internal.h kernels_arm.h

# The compiler whose target decides the SIMD flags (the engine's CC when included, KCC standalone).
KCC ?= $(CC)
MMOE_KTARGET := $(shell $(KCC) -dumpmachine 2>/dev/null)
ifneq ($(findstring x86_64,$(MMOE_KTARGET)),)
MMOE_KFLAGS_kernels_avx2.c := -mavx2 -mfma -mf16c
endif
ifneq ($(findstring aarch64,$(MMOE_KTARGET)),)
MMOE_KFLAGS_kernels_dotprod.c := -march=armv8.2-a+dotprod
MMOE_KFLAGS_kernels_i8mm.c := -march=armv8.2-a+dotprod+i8mm
endif

# ---- standalone kernel test / benchmark (these targets never become the including Makefile's default goal) ----
MMOE_KSAVED_GOAL := $(.DEFAULT_GOAL)
KBUILD ?= $(MMOE_KDIR)/../build/kernels
KCFLAGS ?= -std=c11 -O2 -Wall -Wextra -Werror -ffp-contract=off
KLDFLAGS ?=
KLDLIBS := $(if $(KSTATIC),-static) $(KLDFLAGS) -lm -pthread
MMOE_KOBJS := $(addprefix $(KBUILD)/k_,$(MMOE_KERNEL_SRCS:.c=.o))

.PHONY: kernel-test kernel-bench
kernel-test: $(KBUILD)/test_kernels
kernel-bench: $(KBUILD)/bench_kernels

$(KBUILD):
	mkdir -p $@

$(KBUILD)/k_%.o: $(MMOE_KDIR)/%.c $(addprefix $(MMOE_KDIR)/,$(MMOE_KERNEL_HDRS)) | $(KBUILD)
	$(KCC) $(KCFLAGS) $(MMOE_KFLAGS_$(notdir $<)) -c $< -o $@

$(KBUILD)/t_%.o: $(MMOE_KDIR)/tests/%.c $(MMOE_KDIR)/kernels.h | $(KBUILD)
	$(KCC) $(KCFLAGS) -c $< -o $@

$(KBUILD)/test_kernels: $(MMOE_KOBJS) $(KBUILD)/t_test_kernels.o
	$(KCC) $^ -o $@ $(KLDLIBS)

$(KBUILD)/bench_kernels: $(MMOE_KOBJS) $(KBUILD)/t_bench_kernels.o
	$(KCC) $^ -o $@ $(KLDLIBS)

.DEFAULT_GOAL := $(MMOE_KSAVED_GOAL)
