/* The pod sandbox ("pause") process: holds the pod's namespaces and waits to be told to stop. */
#include <signal.h>
#include <unistd.h>

static void stop(int signal_number) {
    (void)signal_number;
    _exit(0);
}

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    for (;;) {
        pause();
    }
}
