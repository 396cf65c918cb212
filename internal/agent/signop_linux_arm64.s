#include "textflag.h"

// sigNop is a signal handler that does nothing: it returns to the kernel's
// sigreturn trampoline in the vDSO, as the Go runtime's own handlers do on
// arm64 (no sa_restorer).
TEXT sigNop<>(SB),NOSPLIT|NOFRAME,$0
	RET

// func sigNopAddr() uintptr
TEXT ·sigNopAddr(SB),NOSPLIT,$0-8
	MOVD	$sigNop<>(SB), R0
	MOVD	R0, ret+0(FP)
	RET

// func sigRestorerAddr() uintptr
TEXT ·sigRestorerAddr(SB),NOSPLIT,$0-8
	MOVD	ZR, ret+0(FP)
	RET
