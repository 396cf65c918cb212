#include "textflag.h"

// sigNop is a signal handler that does nothing. It touches no register the
// kernel does not restore and runs on the alternate signal stack (every Go
// thread has one).
TEXT sigNop<>(SB),NOSPLIT|NOFRAME,$0
	RET

// sigRestorer is where sigNop returns to: x86-64 needs an sa_restorer that
// calls rt_sigreturn, as the Go runtime's own handlers have.
TEXT sigRestorer<>(SB),NOSPLIT|NOFRAME,$0
	MOVQ	$15, AX	// SYS_rt_sigreturn
	SYSCALL
	INT	$3	// not reached

// func sigNopAddr() uintptr
TEXT ·sigNopAddr(SB),NOSPLIT,$0-8
	LEAQ	sigNop<>(SB), AX
	MOVQ	AX, ret+0(FP)
	RET

// func sigRestorerAddr() uintptr
TEXT ·sigRestorerAddr(SB),NOSPLIT,$0-8
	LEAQ	sigRestorer<>(SB), AX
	MOVQ	AX, ret+0(FP)
	RET
