/* What a hostile pooled task would try with a compiler at hand (the isolation tests' tool):
 *   attack ptrace PID   attach to PID with ptrace and read its memory; prints what worked
 *   attack ipc SECRET   leave SysV shared memory, a message queue and semaphores behind
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/ptrace.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/types.h>
#include <sys/uio.h>

static int trace(pid_t pid) {
    if (ptrace(PTRACE_ATTACH, pid, 0, 0) == 0) puts("ptrace-attach: allowed");
    else printf("ptrace-attach: %s\n", strerror(errno));
    if (ptrace(PTRACE_SEIZE, pid, 0, 0) == 0) puts("ptrace-seize: allowed");
    else printf("ptrace-seize: %s\n", strerror(errno));
    char buffer[16];
    struct iovec local = {buffer, sizeof buffer}, remote = {(void *)0x400000, sizeof buffer};
    if (process_vm_readv(pid, &local, 1, &remote, 1, 0) >= 0) puts("process-vm-readv: allowed");
    else printf("process-vm-readv: %s\n", strerror(errno));
    return 0;
}

static int leave_ipc(const char *secret) {
    int shm = shmget(IPC_PRIVATE, 4096, IPC_CREAT | 0666);
    if (shm >= 0) {
        char *memory = shmat(shm, NULL, 0);
        if (memory != (void *)-1) strncpy(memory, secret, 4095);
    }
    int queue = msgget(IPC_PRIVATE, IPC_CREAT | 0666);
    int sem = semget(IPC_PRIVATE, 1, IPC_CREAT | 0666);
    printf("shm %d queue %d sem %d\n", shm, queue, sem);
    return shm < 0 || queue < 0 || sem < 0;
}

int main(int argc, char **argv) {
    if (argc == 3 && !strcmp(argv[1], "ptrace")) return trace((pid_t)atoi(argv[2]));
    if (argc == 3 && !strcmp(argv[1], "ipc")) return leave_ipc(argv[2]);
    fprintf(stderr, "usage: attack ptrace PID | ipc SECRET\n");
    return 2;
}
