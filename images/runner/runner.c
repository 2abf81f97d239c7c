/*
 * agentainer-runner: the task runner of a pool agent, as clean for each task as a fresh container.
 *
 * It is the agent's PID 1. The controller sends it requests, one line each, on its stdin (the
 * container's attached stdin, which no task can reach) and reads its answers, one line each, on
 * its stdout (which only the runner writes). A task's output travels base64-encoded inside frames
 * that carry the task's id, so nothing a task prints can end a frame or forge one.
 *
 * A task runs as the task user (not the runner's user, unless the whole agent runs as one
 * non-root user or the pool opted into root), in a session of its own, with stdin from /dev/null,
 * exactly the environment of the image plus what the request gives, and a fresh working directory
 * that is also its HOME. When the task ends (it exits, its deadline passes, or it is cancelled)
 * every other process of the agent is killed and reaped, whatever the task left in the places it
 * could write is removed, and the runner checks that those places are as they were when the agent
 * started. When it cannot prove that, the task's EXIT frame says "unclean" and the controller
 * replaces the agent instead of handing it to the next task.
 *
 * The runner protects itself: it is not dumpable (no task can open its /proc entries, its
 * descriptors among them, or ptrace it), and as the namespace's init it cannot be killed or
 * stopped from inside; other signals from inside are read and dropped.
 *
 * Protocol agentainer-runner/1, one request per line on stdin:
 *   HELLO <nonce>               READY <nonce> agentainer-runner/1 <mode> <uid> <gid>
 *   TASK <id> <payload>         OUT <id> <chunk> ... ERR <id> <chunk> ... then
 *                               EXIT <id> <code> <flags> <run us> <clean-up us> <note>
 *   CANCEL <id>                 the task is ended now; its EXIT carries "cancelled"
 * A request that cannot run is answered FAIL <id> <message>. Payload, chunks, note and message
 * are base64; the payload holds NUL-terminated records "arg=WORD", "env=NAME=VALUE",
 * "timeout_ms=N" and "limit=N" (bytes kept of stdout, its head, and of stderr, its tail, each;
 * stdout is sent as it comes, stderr at the end). Flags are "-" or a
 * comma-separated list of timeout, cancelled, stdout-truncated, stderr-truncated, unclean.
 * Modes: "user" (tasks as another user than the runner's), "shared" (runner and tasks one
 * non-root user), "root" (tasks as root, by the pool's choice).
 *
 *   runner serve [--uid N] [--gid N]   run tasks (as PID 1 of the agent)
 *   runner workspace DIR              make DIR (a workflow's shared workspace volume, new and
 *                                      empty) writable by every agent's user: mode 1777
 *   runner exec --out DIR --limit N [--log-limit M] [--user USER] [--set-home] -- COMMAND...
 *                                      run one command (an agent of its own): its output goes to
 *                                      the container's log as ever, and its head (stdout) and
 *                                      tail (stderr) to DIR with its exit code and the signal
 *                                      that stopped it from outside if any (DIR/exit), where
 *                                      they outlive a container engine that was down when the
 *                                      command ended. Started as root, it runs the command as
 *                                      USER (the image's, as the runtime would), so the command
 *                                      cannot touch DIR. It logs no more than the engine's log
 *                                      of M bytes holds (which past that would drop its start,
 *                                      the head of stdout with it): a last line on stderr then
 *                                      says the rest was not logged (LOG_FULL)
 *   runner install PATH                copy itself to PATH (an init container's job)
 *   runner version                     print the protocol
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/prctl.h>
#include <sys/sem.h>
#include <sys/shm.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PROTOCOL "agentainer-runner/1"
#define RUNNER_BIN_DIR "/agentainer/bin"
#define TASKS_DIR "/agentainer/tasks"
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MAX_REQUEST (64u << 20)      /* a request line: argv and env of one task, base64 */
#define CHUNK (48u << 10)            /* raw bytes per OUT/ERR frame (64 KiB of base64) */
#define KILL_DEADLINE_MS 5000        /* every process gone within this, or the agent is unclean */
#define CLEAN_DEADLINE_MS 20000      /* files removed within this, or the agent is unclean */
#define MAX_TRACKED 1000000          /* entries walked at start; more and nothing is tracked */
#define MAX_DEPTH 256                /* directories in directories, at most, walked at start */
#define MAX_ID 64
#define MAX_LIMIT (64u << 20)        /* bytes kept of a task's stdout, and of its stderr */

enum mode { MODE_USER, MODE_SHARED, MODE_ROOT };
static const char *mode_names[] = {"user", "shared", "root"};

static enum mode mode;
static uid_t task_uid;
static gid_t task_gid;
static char **base_env;              /* the image's environment, HOME left out */
static size_t base_env_count;
static int signal_fd = -1;

/* --- small helpers -------------------------------------------------------------------------- */

static int64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static void fatal(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("agentainer-runner: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(2);
}

static void *xmalloc(size_t size) {
    void *p = malloc(size ? size : 1);
    if (!p) fatal("out of memory");
    return p;
}

static void *xrealloc(void *old, size_t size) {
    void *p = realloc(old, size ? size : 1);
    if (!p) fatal("out of memory");
    return p;
}

static char *xstrdup(const char *s) {
    char *p = strdup(s);
    if (!p) fatal("out of memory");
    return p;
}

static void write_all(int fd, const void *data, size_t size) {
    const char *p = data;
    while (size > 0) {
        ssize_t n = write(fd, p, size);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) {
                struct pollfd w = {.fd = fd, .events = POLLOUT};
                poll(&w, 1, 1000);
                continue;
            }
            exit(3);  /* the channel is gone: nobody can be told anything any more */
        }
        p += n;
        size -= (size_t)n;
    }
}

/* --- base64 --------------------------------------------------------------------------------- */

static const char b64chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static size_t b64_encode(const uint8_t *in, size_t n, char *out) {
    size_t o = 0, i = 0;
    for (; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = b64chars[v >> 18 & 63];
        out[o++] = b64chars[v >> 12 & 63];
        out[o++] = b64chars[v >> 6 & 63];
        out[o++] = b64chars[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = b64chars[v >> 18 & 63];
        out[o++] = b64chars[v >> 12 & 63];
        out[o++] = i + 1 < n ? b64chars[v >> 6 & 63] : '=';
        out[o++] = '=';
    }
    return o;
}

static int b64_value(char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Decodes in place; returns the decoded size, or -1 when the text is not base64. */
static ssize_t b64_decode(char *text, size_t n) {
    uint8_t *out = (uint8_t *)text;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    size_t i = 0;
    for (; i < n && text[i] != '='; i++) {
        int v = b64_value(text[i]);
        if (v < 0) return -1;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    for (; i < n; i++)
        if (text[i] != '=') return -1;
    return (ssize_t)o;
}

/* --- frames --------------------------------------------------------------------------------- */

/* "KIND ID BASE64\n" with an optional middle part of plain words. */
static void send_frame(const char *kind, const char *id, const char *words,
                       const uint8_t *data, size_t size) {
    size_t head = strlen(kind) + strlen(id) + (words ? strlen(words) + 1 : 0) + 3;
    char *line = xmalloc(head + (size + 2) / 3 * 4 + 2);
    size_t at = (size_t)sprintf(line, "%s %s %s%s", kind, id, words ? words : "",
                                words ? " " : "");
    at += b64_encode(data, size, line + at);
    if (size == 0) line[at++] = '-';  /* never an empty last field */
    line[at++] = '\n';
    write_all(STDOUT_FILENO, line, at);
    free(line);
}

static void send_fail(const char *id, const char *format, ...) {
    char message[512];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    send_frame("FAIL", id, NULL, (const uint8_t *)message, strlen(message));
}

/* --- what the agent looked like at start ---------------------------------------------------- */

/* An entry of a directory the task user may write to. Names are kept as a 64-bit hash: a
 * collision can only make a new entry look like an old one that changed, which makes the agent
 * unclean, never clean. */
struct entry {
    uint64_t name;
    ino_t ino;
    mode_t mode;
    uid_t uid;
    gid_t gid;
    struct timespec ctime;
};

struct place {              /* a directory the task user may write to, and its entries */
    char *path;
    dev_t dev;
    ino_t ino;
    mode_t mode;
    uid_t uid;
    gid_t gid;
    struct entry *entries;  /* sorted by name */
    size_t count;
};

struct file {               /* a file elsewhere that the task user may write to */
    char *path;
    dev_t dev;
    ino_t ino;
    struct timespec ctime;
};

static struct place *places;
static size_t place_count, place_cap;
static struct file *files;
static size_t file_count, file_cap;
static size_t walked;
static bool untracked;      /* the start state could not be taken: every task ends unclean */
static char untracked_why[200];

struct ipc_ids { int *ids; size_t count; };
static struct ipc_ids ipc_start[3];  /* shm, msg, sem present at start */

static uint64_t name_hash(const char *s) {
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ULL;
    return h;
}

static bool task_may_write(const struct stat *st) {
    if (task_uid == 0) return true;
    if (st->st_uid == task_uid) return st->st_mode & S_IWUSR;
    if (st->st_gid == task_gid) return st->st_mode & S_IWGRP;
    return st->st_mode & S_IWOTH;
}

static void add_place(const char *path, const struct stat *st) {
    if (place_count == place_cap) {
        place_cap = place_cap ? place_cap * 2 : 16;
        places = xrealloc(places, place_cap * sizeof *places);
    }
    places[place_count++] = (struct place){.path = xstrdup(path), .dev = st->st_dev,
        .ino = st->st_ino, .mode = st->st_mode, .uid = st->st_uid, .gid = st->st_gid};
}

static void add_file(const char *path, const struct stat *st) {
    if (file_count == file_cap) {
        file_cap = file_cap ? file_cap * 2 : 16;
        files = xrealloc(files, file_cap * sizeof *files);
    }
    files[file_count++] = (struct file){.path = xstrdup(path), .dev = st->st_dev,
        .ino = st->st_ino, .ctime = st->st_ctim};
}

static bool too_many(void) {
    if (++walked <= MAX_TRACKED) return false;
    snprintf(untracked_why, sizeof untracked_why, "more than %d files in the image", MAX_TRACKED);
    untracked = true;
    return true;
}

/* Note every directory and regular file under ``path`` (a directory, ``st`` its lstat) that
   the task user may write, depth first, following no symbolic link, not into /proc, /sys or
   the runner's own directory. Written out rather than nftw's: skipping a subtree there is
   glibc's alone, and the runner is built against musl too. False: stop, nothing is tracked. */
static bool walk(const char *path, const struct stat *st, int depth) {
    if (too_many()) return false;
    if (!strcmp(path, "/proc") || !strcmp(path, "/sys") || !strcmp(path, RUNNER_BIN_DIR))
        return true;
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    DIR *dir = fd < 0 ? NULL : fdopendir(fd);
    if (!dir) {
        if (fd >= 0) close(fd);
        if (!task_may_write(st)) return true;  /* the task cannot write there either */
        snprintf(untracked_why, sizeof untracked_why, "cannot list %s", path);
        untracked = true;
        return false;
    }
    if (task_may_write(st)) add_place(path, st);
    bool going = true;
    struct dirent *d;
    while (going && (d = readdir(dir))) {
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..")) continue;
        struct stat child;
        if (fstatat(fd, d->d_name, &child, AT_SYMLINK_NOFOLLOW) < 0) continue;
        char inner[PATH_MAX];
        int length = snprintf(inner, sizeof inner, "%s/%s", strcmp(path, "/") ? path : "",
                              d->d_name);
        if (length < 0 || (size_t)length >= sizeof inner || depth >= MAX_DEPTH) {
            snprintf(untracked_why, sizeof untracked_why, "a path too long or deep under %s",
                     path);
            untracked = true;
            going = false;
        } else if (S_ISDIR(child.st_mode)) {
            going = walk(inner, &child, depth + 1);
        } else if (too_many()) {
            going = false;
        } else if (S_ISREG(child.st_mode) && task_may_write(&child)) {
            add_file(inner, &child);
        }
    }
    closedir(dir);
    return going;
}

static int compare_entries(const void *a, const void *b) {
    uint64_t x = ((const struct entry *)a)->name, y = ((const struct entry *)b)->name;
    return x < y ? -1 : x > y;
}

static bool list_place(struct place *place) {
    int fd = open(place->path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return false;
    DIR *dir = fdopendir(fd);
    if (!dir) {
        close(fd);
        return false;
    }
    size_t cap = 0;
    struct dirent *d;
    while ((d = readdir(dir))) {
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..")) continue;
        struct stat st;
        if (fstatat(fd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        if (place->count == cap) {
            cap = cap ? cap * 2 : 8;
            place->entries = xrealloc(place->entries, cap * sizeof *place->entries);
        }
        place->entries[place->count++] = (struct entry){.name = name_hash(d->d_name),
            .ino = st.st_ino, .mode = st.st_mode, .uid = st.st_uid, .gid = st.st_gid,
            .ctime = st.st_ctim};
    }
    closedir(dir);
    qsort(place->entries, place->count, sizeof *place->entries, compare_entries);
    return true;
}

static const char *ipc_files[3] = {"/proc/sysvipc/shm", "/proc/sysvipc/msg", "/proc/sysvipc/sem"};

/* SysV IPC objects of the agent's IPC namespace, by kind: their ids (the second column). */
static struct ipc_ids ipc_list(int kind) {
    struct ipc_ids ids = {0};
    FILE *f = fopen(ipc_files[kind], "re");
    if (!f) return ids;
    char line[512];
    size_t cap = 0;
    if (!fgets(line, sizeof line, f)) {
        fclose(f);
        return ids;
    }
    while (fgets(line, sizeof line, f)) {
        long key, id;
        if (sscanf(line, "%ld %ld", &key, &id) != 2) continue;
        if (ids.count == cap) {
            cap = cap ? cap * 2 : 8;
            ids.ids = xrealloc(ids.ids, cap * sizeof *ids.ids);
        }
        ids.ids[ids.count++] = (int)id;
    }
    fclose(f);
    return ids;
}

static void take_start_state(void) {
    if (mode == MODE_ROOT) {
        /* Root may write anywhere: only the usual scratch places are put back. */
        const char *usual[] = {"/tmp", "/var/tmp", "/dev/shm", "/dev/mqueue", TASKS_DIR};
        for (size_t i = 0; i < sizeof usual / sizeof *usual; i++) {
            struct stat st;
            if (lstat(usual[i], &st) == 0 && S_ISDIR(st.st_mode)) add_place(usual[i], &st);
        }
    } else {
        struct stat root;
        if (lstat("/", &root) < 0) {
            snprintf(untracked_why, sizeof untracked_why, "walking the file system: %s",
                     strerror(errno));
            untracked = true;
        } else {
            walk("/", &root, 0);
        }
    }
    for (size_t i = 0; i < place_count && !untracked; i++) {
        if (!list_place(&places[i])) {
            snprintf(untracked_why, sizeof untracked_why, "cannot list %s", places[i].path);
            untracked = true;
        }
    }
    for (int kind = 0; kind < 3; kind++) ipc_start[kind] = ipc_list(kind);
    if (untracked)
        fprintf(stderr, "agentainer-runner: %s: every task will end unclean\n", untracked_why);
}

/* --- removing what a task left -------------------------------------------------------------- */

/* Opens the directory NAME in PARENT to empty it, making it ours to empty if its owner (the
 * task) took the rights away. */
static int open_to_empty(int parent, const char *name) {
    int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && errno == EACCES) {
        fchmodat(parent, name, 0700, 0);
        fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    }
    struct stat st;
    if (fd >= 0 && fstat(fd, &st) == 0 && (st.st_mode & 0700) != 0700) fchmod(fd, 0700);
    return fd;
}

/* Removes every entry of DIR that is not a directory, and every empty directory; returns the
 * name of a directory that is not empty (to be emptied first), or NULL when DIR is empty. */
static char *empty_shallow(int fd) {
    int listing = dup(fd);
    DIR *dir = listing >= 0 ? fdopendir(listing) : NULL;
    if (!dir) {
        if (listing >= 0) close(listing);
        return NULL;
    }
    char *deeper = NULL;
    struct dirent *d;
    while ((d = readdir(dir))) {
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..")) continue;
        struct stat st;
        if (fstatat(fd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        if (!S_ISDIR(st.st_mode)) {
            unlinkat(fd, d->d_name, 0);
        } else if (unlinkat(fd, d->d_name, AT_REMOVEDIR) < 0 && !deeper) {
            deeper = xstrdup(d->d_name);
        }
    }
    closedir(dir);
    return deeper;
}

/* Removes NAME in the directory DIRFD, a whole tree if it is one, without following links and
 * without holding a descriptor per level (a task may leave a tree thousands of levels deep).
 * Every process of the task is gone by now, so the tree stands still while it is removed, and
 * ".." of each directory is the one it was entered from. */
static bool remove_tree(int dirfd, const char *name, int64_t deadline) {
    struct stat st;
    if (fstatat(dirfd, name, &st, AT_SYMLINK_NOFOLLOW) < 0) return errno == ENOENT;
    if (!S_ISDIR(st.st_mode)) return unlinkat(dirfd, name, 0) == 0 || errno == ENOENT;
    char **path = xmalloc(sizeof *path);  /* names from NAME down to the current directory */
    size_t depth = 1, cap = 1;
    path[0] = xstrdup(name);
    int current = open_to_empty(dirfd, name);
    bool ok = false;
    while (current >= 0 && now_us() < deadline) {
        char *deeper = empty_shallow(current);
        if (deeper) {
            int fd = open_to_empty(current, deeper);
            if (fd < 0) {
                free(deeper);
                break;
            }
            if (depth == cap) path = xrealloc(path, (cap *= 2) * sizeof *path);
            path[depth++] = deeper;
            close(current);
            current = fd;
            continue;
        }
        char *emptied = path[--depth];
        int parent = depth > 0 ? openat(current, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
                               : dup(dirfd);
        close(current);
        current = parent;
        bool removed = parent >= 0 &&
                       (unlinkat(parent, emptied, AT_REMOVEDIR) == 0 || errno == ENOENT);
        free(emptied);
        if (!removed) break;
        if (depth == 0) {
            ok = true;
            break;
        }
    }
    if (current >= 0) close(current);
    while (depth > 0) free(path[--depth]);
    free(path);
    return ok;
}

static bool same_time(struct timespec a, struct timespec b) {
    return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec;
}

static void note_once(char *note, size_t size, const char *format, ...) {
    if (note[0]) return;  /* the first reason is enough */
    va_list args;
    va_start(args, format);
    vsnprintf(note, size, format, args);
    va_end(args);
}

/* Puts one place back as it was at start; false when something old was changed or removed. */
static bool restore_place(const struct place *place, int64_t deadline, char *note, size_t size) {
    int fd = open(place->path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || st.st_dev != place->dev || st.st_ino != place->ino ||
        st.st_mode != place->mode || st.st_uid != place->uid || st.st_gid != place->gid) {
        note_once(note, size, "%s was changed", place->path);
        if (fd >= 0) close(fd);
        return false;
    }
    DIR *dir = fdopendir(dup(fd));
    if (!dir) {
        close(fd);
        note_once(note, size, "cannot list %s", place->path);
        return false;
    }
    bool ok = true;
    size_t kept = 0;
    struct dirent *d;
    while ((d = readdir(dir))) {
        if (!strcmp(d->d_name, ".") || !strcmp(d->d_name, "..")) continue;
        if (fstatat(fd, d->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) continue;
        struct entry key = {.name = name_hash(d->d_name)};
        const struct entry *old = bsearch(&key, place->entries, place->count,
                                          sizeof *place->entries, compare_entries);
        if (old && old->ino == st.st_ino) {
            kept++;
            /* A directory's times change with what is in it (checked on its own); a file's
             * change time moves with every write, and no task can set it back. */
            bool same = st.st_mode == old->mode && st.st_uid == old->uid &&
                        st.st_gid == old->gid &&
                        (S_ISDIR(st.st_mode) || same_time(st.st_ctim, old->ctime));
            if (!same) {
                note_once(note, size, "%s/%s was changed", place->path, d->d_name);
                ok = false;
            }
        } else if (!remove_tree(fd, d->d_name, deadline)) {
            note_once(note, size, "cannot remove %s/%s", place->path, d->d_name);
            ok = false;
        }
    }
    closedir(dir);
    close(fd);
    if (kept != place->count) {
        note_once(note, size, "something in %s was removed", place->path);
        ok = false;
    }
    return ok;
}

static bool ipc_known(const struct ipc_ids *ids, int id) {
    for (size_t i = 0; i < ids->count; i++)
        if (ids->ids[i] == id) return true;
    return false;
}

/* Removes the SysV IPC objects made since start. Only their owner may (or a capability no
 * runner has), so a runner that is root removes them as the task user, in a child. */
static bool remove_new_ipc(char *note, size_t size) {
    struct ipc_ids fresh[3];
    size_t count = 0;
    for (int kind = 0; kind < 3; kind++) {
        fresh[kind] = ipc_list(kind);
        size_t kept = 0;
        for (size_t i = 0; i < fresh[kind].count; i++)
            if (!ipc_known(&ipc_start[kind], fresh[kind].ids[i]))
                fresh[kind].ids[kept++] = fresh[kind].ids[i];
        fresh[kind].count = kept;
        count += kept;
    }
    int status = 0;
    if (count > 0) {
        pid_t child = fork();
        if (child == 0) {
            if (mode == MODE_USER && (setgroups(0, NULL) < 0 ||
                                      setresgid(task_gid, task_gid, task_gid) < 0 ||
                                      setresuid(task_uid, task_uid, task_uid) < 0))
                _exit(2);
            int failed = 0;
            for (int kind = 0; kind < 3; kind++) {
                for (size_t i = 0; i < fresh[kind].count; i++) {
                    int id = fresh[kind].ids[i];
                    int r = kind == 0 ? shmctl(id, IPC_RMID, NULL)
                          : kind == 1 ? msgctl(id, IPC_RMID, NULL)
                                      : semctl(id, 0, IPC_RMID);
                    if (r < 0 && errno != EINVAL && errno != EIDRM) failed = 1;
                }
            }
            _exit(failed);
        }
        if (child < 0 || waitpid(child, &status, 0) < 0) status = -1;
    }
    for (int kind = 0; kind < 3; kind++) free(fresh[kind].ids);
    if (status != 0) {
        note_once(note, size, "cannot remove the SysV IPC objects the task made");
        return false;
    }
    return true;
}

static bool restore_files(const char *workdir, char *note, size_t size) {
    int64_t deadline = now_us() + (int64_t)CLEAN_DEADLINE_MS * 1000;
    bool ok = true;
    int tasks = open(TASKS_DIR, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (tasks < 0 || !remove_tree(tasks, workdir, deadline)) {
        note_once(note, size, "cannot remove the working directory");
        ok = false;
    }
    if (tasks >= 0) close(tasks);
    if (untracked) {
        note_once(note, size, "%s", untracked_why);
        return false;
    }
    for (size_t i = 0; i < place_count; i++)
        ok &= restore_place(&places[i], deadline, note, size);
    for (size_t i = 0; i < file_count; i++) {
        struct stat st;
        if (lstat(files[i].path, &st) < 0 || st.st_dev != files[i].dev ||
            st.st_ino != files[i].ino || !same_time(st.st_ctim, files[i].ctime)) {
            note_once(note, size, "%s was changed", files[i].path);
            ok = false;
        }
    }
    ok &= remove_new_ipc(note, size);
    if (now_us() > deadline) {
        note_once(note, size, "cleaning up took longer than %d ms", CLEAN_DEADLINE_MS);
        ok = false;
    }
    return ok;
}

/* --- processes ------------------------------------------------------------------------------ */

struct task {
    char id[MAX_ID + 1];
    pid_t pid;                /* the task's first process; 0 once reaped */
    int status;
    int out, err;             /* read ends of its stdout and stderr; -1 once at end */
    size_t limit, kept[2];
    bool truncated[2];
    uint8_t *tail;            /* the last `limit` bytes of stderr, a ring from `tail_at` */
    size_t tail_at;
    bool timed_out, cancelled;
    int64_t started, deadline; /* microseconds; deadline 0: none */
    char workdir[MAX_ID + 8];
};

static bool other_processes(void) {
    DIR *proc = opendir("/proc");
    if (!proc) return true;
    bool found = false;
    struct dirent *d;
    pid_t self = getpid();
    while ((d = readdir(proc))) {
        char *end;
        long pid = strtol(d->d_name, &end, 10);
        if (*end || pid <= 0 || pid == self) continue;
        found = true;
        break;
    }
    closedir(proc);
    return found;
}

static void reap(struct task *task) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        if (task && pid == task->pid) {
            task->status = status;
            task->pid = 0;
        }
    }
}

static void drain_signals(void) {
    struct signalfd_siginfo info;
    while (read(signal_fd, &info, sizeof info) == sizeof info) {
        /* Only the container's runtime, outside the agent's PID namespace (sender pid 0),
         * may stop the runner; the same signals from a task are dropped. */
        if (info.ssi_signo != SIGCHLD && info.ssi_pid == 0) {
            kill(-1, SIGKILL);
            exit(0);
        }
    }
}

/* Kills every process of the agent but the runner, and waits for them to be gone. */
static bool kill_all(struct task *task) {
    int64_t deadline = now_us() + (int64_t)KILL_DEADLINE_MS * 1000;
    for (;;) {
        kill(-1, SIGKILL);  /* as the namespace's init: every other process it may signal */
        reap(task);
        if (!other_processes()) return true;
        if (now_us() > deadline) return false;
        struct pollfd p = {.fd = signal_fd, .events = POLLIN};
        poll(&p, 1, 5);
        drain_signals();
    }
}

/* --- running one task ----------------------------------------------------------------------- */

struct request {
    char **argv;
    size_t argc;
    char **env;
    size_t envc;
    int64_t timeout_ms;
    size_t limit;
};

static bool parse_payload(char *payload, size_t size, struct request *req, char *why, size_t n) {
    memset(req, 0, sizeof *req);
    req->limit = 1 << 20;
    if (size == 0 || payload[size - 1] != '\0') {
        snprintf(why, n, "malformed payload");
        return false;
    }
    for (size_t at = 0; at < size;) {
        char *record = payload + at;
        at += strlen(record) + 1;
        if (!strncmp(record, "arg=", 4)) {
            req->argv = xrealloc(req->argv, (req->argc + 2) * sizeof *req->argv);
            req->argv[req->argc++] = record + 4;
        } else if (!strncmp(record, "env=", 4)) {
            char *eq = strchr(record + 4, '=');
            if (!eq || eq == record + 4) {
                snprintf(why, n, "malformed environment variable");
                return false;
            }
            req->env = xrealloc(req->env, (req->envc + 1) * sizeof *req->env);
            req->env[req->envc++] = record + 4;
        } else if (!strncmp(record, "timeout_ms=", 11)) {
            req->timeout_ms = strtoll(record + 11, NULL, 10);
        } else if (!strncmp(record, "limit=", 6)) {
            req->limit = (size_t)strtoull(record + 6, NULL, 10);
            if (req->limit > MAX_LIMIT) req->limit = MAX_LIMIT;
        }
    }
    if (req->argc == 0) {
        snprintf(why, n, "a task needs a command");
        return false;
    }
    req->argv[req->argc] = NULL;
    return true;
}

static bool same_name(const char *a, const char *b) {
    size_t i = 0;
    for (; a[i] && a[i] != '=' && b[i] && b[i] != '='; i++)
        if (a[i] != b[i]) return false;
    return (a[i] == '=' || !a[i]) && (b[i] == '=' || !b[i]);
}

/* The task's environment: the image's, then the request's (which wins), HOME and PATH by
 * default. Nothing of the runner's or of an earlier task's. */
static char **task_environment(const struct request *req, const char *home) {
    static char home_variable[PATH_MAX + 6];
    char **env = xmalloc((base_env_count + req->envc + 3) * sizeof *env);
    size_t n = 0;
    for (size_t i = 0; i < base_env_count; i++) {
        bool overridden = false;
        for (size_t j = 0; j < req->envc && !overridden; j++)
            overridden = same_name(base_env[i], req->env[j]);
        if (!overridden) env[n++] = base_env[i];
    }
    for (size_t j = 0; j < req->envc; j++) env[n++] = req->env[j];
    bool has_home = false, has_path = false;
    for (size_t i = 0; i < n; i++) {
        has_home |= !strncmp(env[i], "HOME=", 5);
        has_path |= !strncmp(env[i], "PATH=", 5);
    }
    if (!has_home) {
        snprintf(home_variable, sizeof home_variable, "HOME=%s", home);
        env[n++] = home_variable;
    }
    if (!has_path) env[n++] = "PATH=" DEFAULT_PATH;
    env[n] = NULL;
    return env;
}

static void child_fail(int code, const char *what, const char *arg) {
    dprintf(STDERR_FILENO, "agentainer-runner: %s%s%s: %s\n", what, arg ? " " : "",
            arg ? arg : "", strerror(errno));
    _exit(code);
}

/* In the forked child: become the task, then execute its command with the PATH of its own
 * environment, as a container's runtime does. Never returns. */
static void become_task(const struct request *req, char **env, const char *workdir,
                        int out, int err) {
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    for (int sig = 1; sig < NSIG; sig++) signal(sig, SIG_DFL);
    setsid();
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, STDIN_FILENO) < 0 || dup2(out, STDOUT_FILENO) < 0 ||
        dup2(err, STDERR_FILENO) < 0)
        _exit(126);
    /* Nothing of the runner's reaches the task: not the channel, not any other descriptor. */
    if (syscall(SYS_close_range, 3, ~0U, 0) < 0)
        for (int fd = 3; fd < 65536; fd++) close(fd);
    int adj = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (adj >= 0) {
        /* Out of memory, the kernel kills a task before the runner. */
        if (write(adj, "1000", 4) < 0) { /* best effort */ }
        close(adj);
    }
    umask(022);
    if (mode == MODE_USER || mode == MODE_ROOT) {
        if (setgroups(0, NULL) < 0) child_fail(126, "dropping groups", NULL);
        if (setresgid(task_gid, task_gid, task_gid) < 0) child_fail(126, "setting the group", NULL);
        if (setresuid(task_uid, task_uid, task_uid) < 0) child_fail(126, "setting the user", NULL);
        if (getuid() != task_uid || geteuid() != task_uid) _exit(126);
    }
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    if (chdir(workdir) < 0) child_fail(126, "entering", workdir);
    const char *file = req->argv[0];
    if (strchr(file, '/')) {
        execve(file, req->argv, env);
        child_fail(errno == ENOENT ? 127 : 126, "exec", file);
    }
    const char *path = DEFAULT_PATH;
    for (char **e = env; *e; e++)
        if (!strncmp(*e, "PATH=", 5)) path = *e + 5;
    int first_error = ENOENT;
    char candidate[PATH_MAX];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        int dir_len = (int)(end - p);
        if (snprintf(candidate, sizeof candidate, "%.*s%s%s", dir_len, p, dir_len ? "/" : "",
                     file) < (int)sizeof candidate) {
            execve(candidate, req->argv, env);
            if (errno != ENOENT && errno != ENOTDIR && first_error == ENOENT)
                first_error = errno;
        }
        if (!*end) break;
        p = end;
    }
    errno = first_error;
    child_fail(first_error == ENOENT ? 127 : 126, "exec", file);
}

static bool start_task(struct task *task, const char *id, char *payload_b64, size_t size) {
    ssize_t decoded = b64_decode(payload_b64, size);
    struct request req;
    char why[200];
    if (decoded < 0) {
        send_fail(id, "the payload is not base64");
        return false;
    }
    if (!parse_payload(payload_b64, (size_t)decoded, &req, why, sizeof why)) {
        send_fail(id, "%s", why);
        free(req.argv);
        free(req.env);
        return false;
    }
    memset(task, 0, sizeof *task);
    snprintf(task->id, sizeof task->id, "%s", id);
    snprintf(task->workdir, sizeof task->workdir, "task-%s", id);
    char workdir[sizeof TASKS_DIR + sizeof task->workdir + 1];
    snprintf(workdir, sizeof workdir, "%s/%s", TASKS_DIR, task->workdir);
    int pipes[2][2] = {{-1, -1}, {-1, -1}};
    bool ok = mkdir(workdir, 0700) == 0 &&
              (mode == MODE_SHARED || chown(workdir, task_uid, task_gid) == 0) &&
              pipe2(pipes[0], O_CLOEXEC) == 0 && pipe2(pipes[1], O_CLOEXEC) == 0;
    if (!ok) {
        send_fail(id, "preparing the task: %s", strerror(errno));
        rmdir(workdir);
        for (int i = 0; i < 2; i++)
            for (int j = 0; j < 2; j++)
                if (pipes[i][j] >= 0) close(pipes[i][j]);
        free(req.argv);
        free(req.env);
        return false;
    }
    char **env = task_environment(&req, workdir);
    task->started = now_us();
    pid_t pid = fork();
    if (pid == 0) become_task(&req, env, workdir, pipes[0][1], pipes[1][1]);
    int fork_errno = errno;
    close(pipes[0][1]);
    close(pipes[1][1]);
    free(env);
    free(req.argv);
    free(req.env);
    if (pid < 0) {
        close(pipes[0][0]);
        close(pipes[1][0]);
        rmdir(workdir);
        send_fail(id, "starting the task: %s", strerror(fork_errno));
        return false;
    }
    task->pid = pid;
    task->out = pipes[0][0];
    task->err = pipes[1][0];
    fcntl(task->out, F_SETFL, O_NONBLOCK);
    fcntl(task->err, F_SETFL, O_NONBLOCK);
    task->limit = req.limit;
    task->tail = xmalloc(req.limit);
    task->deadline = req.timeout_ms > 0 ? task->started + req.timeout_ms * 1000 : 0;
    return true;
}

static void keep_tail(struct task *task, const uint8_t *data, size_t size);

/* Reads what is there on one of the task's pipes; false once it is at its end. */
static bool pump(struct task *task, int which) {
    int *fd = which == 0 ? &task->out : &task->err;
    static uint8_t buffer[CHUNK];
    for (;;) {
        ssize_t n = read(*fd, buffer, sizeof buffer);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return true;
        if (n <= 0) {
            close(*fd);
            *fd = -1;
            return false;
        }
        if (which == 1) {
            keep_tail(task, buffer, (size_t)n);
            continue;
        }
        /* stdout is the task's output: its head is sent as it comes; the rest is read and
         * dropped, never kept, and the task never blocks. */
        size_t room = task->limit - task->kept[0];
        size_t keep = (size_t)n < room ? (size_t)n : room;
        if (keep > 0) send_frame("OUT", task->id, NULL, buffer, keep);
        if ((size_t)n > keep) task->truncated[0] = true;
        task->kept[0] += keep;
    }
}

/* stderr says why a task failed, in its last lines: the last `limit` bytes are kept. */
static void keep_tail(struct task *task, const uint8_t *data, size_t size) {
    if (task->limit == 0) {
        task->truncated[1] |= size > 0;
        return;
    }
    if (size >= task->limit) {  /* only the end of this piece stays */
        task->truncated[1] |= task->kept[1] > 0 || size > task->limit;
        memcpy(task->tail, data + size - task->limit, task->limit);
        task->tail_at = 0;
        task->kept[1] = task->limit;
        return;
    }
    for (size_t i = 0; i < size; i++) {
        size_t at = (task->tail_at + task->kept[1]) % task->limit;
        if (task->kept[1] == task->limit) {  /* full: the oldest byte goes */
            task->tail_at = (task->tail_at + 1) % task->limit;
            task->truncated[1] = true;
        } else {
            task->kept[1]++;
        }
        task->tail[at] = data[i];
    }
}

static void send_tail(struct task *task) {
    uint8_t *ordered = xmalloc(task->kept[1]);
    for (size_t i = 0; i < task->kept[1]; i++)
        ordered[i] = task->tail[(task->tail_at + i) % task->limit];
    for (size_t at = 0; at < task->kept[1]; at += CHUNK) {
        size_t n = task->kept[1] - at < CHUNK ? task->kept[1] - at : CHUNK;
        send_frame("ERR", task->id, NULL, ordered + at, n);
    }
    free(ordered);
    free(task->tail);
    task->tail = NULL;
}

static void finish_task(struct task *task) {
    int64_t ended = now_us();
    char note[400] = "";
    bool clean = kill_all(task);
    if (!clean) note_once(note, sizeof note, "a process of the task would not die");
    /* Every writer is gone: what is left in the pipes is the rest of the output, then their
     * end. A pipe still open means a writer lives on; it is not waited for. */
    if (clean) {
        while (task->out >= 0 && pump(task, 0)) {}
        while (task->err >= 0 && pump(task, 1)) {}
    }
    if (task->out >= 0 || task->err >= 0) {
        note_once(note, sizeof note, "the task's output did not end");
        clean = false;
        if (task->out >= 0) close(task->out);
        if (task->err >= 0) close(task->err);
    }
    send_tail(task);
    clean &= restore_files(task->workdir, note, sizeof note);
    int status = task->status;
    int code = WIFEXITED(status) ? WEXITSTATUS(status)
             : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255;
    char flags[100] = "";
    if (task->timed_out) strcat(flags, ",timeout");
    if (task->cancelled) strcat(flags, ",cancelled");
    if (task->truncated[0]) strcat(flags, ",stdout-truncated");
    if (task->truncated[1]) strcat(flags, ",stderr-truncated");
    if (!clean) strcat(flags, ",unclean");
    char words[200];
    snprintf(words, sizeof words, "%d %s %lld %lld", code, flags[0] ? flags + 1 : "-",
             (long long)(ended - task->started), (long long)(now_us() - ended));
    send_frame("EXIT", task->id, words, (const uint8_t *)note, strlen(note));
}

/* --- the request loop ----------------------------------------------------------------------- */

static bool valid_id(const char *id) {
    size_t n = strlen(id);
    if (n == 0 || n > MAX_ID) return false;
    for (size_t i = 0; i < n; i++)
        if (!((id[i] >= '0' && id[i] <= '9') || (id[i] >= 'a' && id[i] <= 'z') ||
              id[i] == '-'))
            return false;
    return true;
}

/* Splits LINE at its first space: LINE keeps the first word; returns the rest, or NULL. */
static char *next_word(char *line) {
    char *space = strchr(line, ' ');
    if (!space) return NULL;
    *space = '\0';
    return space + 1;
}

static void handle(char *line, struct task *task, bool *running) {
    char *id = next_word(line);
    char *rest = id ? next_word(id) : NULL;
    if (!strcmp(line, "HELLO") && id && strlen(id) <= MAX_ID) {
        char reply[256];
        int n = snprintf(reply, sizeof reply, "READY %s %s %s %u %u\n", id, PROTOCOL,
                         mode_names[mode], (unsigned)task_uid, (unsigned)task_gid);
        write_all(STDOUT_FILENO, reply, (size_t)n);
    } else if (!strcmp(line, "TASK") && id && valid_id(id) && rest) {
        if (*running) send_fail(id, "a task is already running");
        else *running = start_task(task, id, rest, strlen(rest));
    } else if (!strcmp(line, "CANCEL") && id) {
        if (*running && !strcmp(id, task->id) && task->pid > 0) {
            task->cancelled = true;
            kill_all(task);
        }
    } else {
        send_fail(id && valid_id(id) ? id : "-", "unknown request");
    }
}

static void serve(void) {
    struct task task = {.out = -1, .err = -1};
    bool running = false;
    size_t cap = 1 << 16, used = 0;
    char *buffer = xmalloc(cap);
    bool skipping = false;  /* inside a request longer than MAX_REQUEST */
    bool input_open = true;
    while (input_open || running) {
        struct pollfd fds[4] = {
            {.fd = input_open ? STDIN_FILENO : -1, .events = POLLIN},
            {.fd = signal_fd, .events = POLLIN},
            {.fd = running ? task.out : -1, .events = POLLIN},
            {.fd = running ? task.err : -1, .events = POLLIN},
        };
        int timeout = -1;
        if (running && task.pid == 0) {
            timeout = 0;
        } else if (running && task.deadline) {
            int64_t left = (task.deadline - now_us()) / 1000;
            timeout = left < 0 ? 0 : left > 60000 ? 60000 : (int)left + 1;
        }
        if (poll(fds, 4, timeout) < 0 && errno != EINTR) fatal("poll: %s", strerror(errno));
        if (fds[1].revents) drain_signals();
        reap(running ? &task : NULL);
        if (running) {
            if (fds[2].revents && task.out >= 0) pump(&task, 0);
            if (fds[3].revents && task.err >= 0) pump(&task, 1);
            if (task.pid > 0 && task.deadline && now_us() >= task.deadline) {
                task.timed_out = true;
                kill_all(&task);
            }
            if (task.pid == 0) {
                finish_task(&task);
                running = false;
            }
        }
        if (!input_open || !(fds[0].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        if (cap - used < 65536) {
            if (cap >= MAX_REQUEST + 65536) {
                skipping = true;  /* drop what was read of it; answer once its end comes */
                used = 0;
            } else {
                cap *= 2;
                buffer = xrealloc(buffer, cap);
            }
        }
        ssize_t n = read(STDIN_FILENO, buffer + used, cap - used);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) {
            /* Nobody can send tasks any more: end the one running, then stop. */
            input_open = false;
            if (running && task.pid > 0) {
                task.cancelled = true;
                kill_all(&task);
            }
            continue;
        }
        size_t start = 0, end = used + (size_t)n;
        for (size_t i = used; i < end; i++) {
            if (buffer[i] != '\n') continue;
            buffer[i] = '\0';
            if (skipping) {
                skipping = false;
                send_fail("-", "request longer than %u bytes", MAX_REQUEST);
            } else {
                handle(buffer + start, &task, &running);
            }
            start = i + 1;
        }
        memmove(buffer, buffer + start, end - start);
        used = end - start;
    }
    kill(-1, SIGKILL);
}

/* --- start ---------------------------------------------------------------------------------- */

static long number(const char *text, const char *what) {
    char *end;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno || *end || value < 0 || value > 2147483647L) fatal("%s: not a user or group id", what);
    return value;
}

static int install(const char *target) {
    int in = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (in < 0) fatal("reading myself: %s", strerror(errno));
    /* A name of its own: several processes may fill the same volume at once; the last
       rename wins, each with a whole copy. */
    char temporary[PATH_MAX];
    snprintf(temporary, sizeof temporary, "%s.XXXXXX", target);
    int out = mkostemp(temporary, O_CLOEXEC);
    if (out < 0) fatal("writing %s: %s", temporary, strerror(errno));
    char buffer[65536];
    ssize_t n;
    while ((n = read(in, buffer, sizeof buffer)) > 0) write_all(out, buffer, (size_t)n);
    if (n < 0 || fchmod(out, 0555) < 0 || close(out) < 0 || rename(temporary, target) < 0)
        fatal("installing %s: %s", target, strerror(errno));
    return 0;
}

/* --- exec: one command, its output kept in files too ---------------------------------------- */

static pid_t exec_child;
static volatile sig_atomic_t first_signal;  /* the first one from outside: who stopped it */

static void forward_signal(int sig) {
    if (!first_signal) first_signal = sig;
    if (exec_child > 0) kill(exec_child, sig);
}

struct kept_file {
    int fd;
    size_t size, limit;
    bool tail;       /* keep the last `limit` bytes (rewriting the file when it doubles) */
    bool truncated;
    char *path;
};

/* Said last on stderr when the log holds no more: then DIR has the output's head and tail. */
#define LOG_FULL "agentainer-runner: the log is full: the rest of the output is not logged"
#define LOG_ROOM 4096u  /* bytes of the log left for that line */

/* At least the bytes Docker's json-file log takes for these bytes of output: each byte
 * escaped at worst as \u00XX, and each line (one cut at 16 KiB too) an entry of its own with
 * its stream's name and time, under 100 bytes more. */
static uint64_t logged_bound(const char *data, size_t n) {
    uint64_t bound = 0, entries = 1 + n / (16u << 10);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)data[i];
        entries += c == '\n';
        bound += (c < 0x20 || c >= 0x7f || c == '<' || c == '>' || c == '&') ? 6
               : (c == '"' || c == '\\') ? 2 : 1;
    }
    return bound + entries * 100;
}

static void keep_in_file(struct kept_file *f, const char *data, size_t n) {
    if (f->fd < 0) return;
    if (!f->tail) {
        size_t room = f->limit - f->size, keep = n < room ? n : room;
        if (keep > 0 && write(f->fd, data, keep) == (ssize_t)keep) f->size += keep;
        f->truncated |= n > keep;
        return;
    }
    if (write(f->fd, data, n) == (ssize_t)n) f->size += n;
    if (f->size < 2 * f->limit + 1) return;
    /* Twice the limit: keep the last `limit` bytes, so the file stays bounded. */
    char *last = xmalloc(f->limit);
    ssize_t got = pread(f->fd, last, f->limit, (off_t)(f->size - f->limit));
    if (got == (ssize_t)f->limit && ftruncate(f->fd, 0) == 0 &&
        pwrite(f->fd, last, f->limit, 0) == (ssize_t)f->limit) {
        lseek(f->fd, (off_t)f->limit, SEEK_SET);
        f->size = f->limit;
        f->truncated = true;
    }
    free(last);
}

/* The command's exit code and the first signal the runner was sent from outside (0: none),
 * in DIR/exit, whole or not at all: an engine that was down when the container ended may not
 * know them, and only the signal tells the engine stopping the container (as it shuts down)
 * from the command ending by itself. */
static void keep_exit_code(const char *out, int code, int signal_number) {
    char path[PATH_MAX], part[PATH_MAX];
    snprintf(path, sizeof path, "%s/exit", out);
    snprintf(part, sizeof part, "%s/exit.part", out);
    int fd = open(part, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    bool written = dprintf(fd, "%d %d\n", code, signal_number) > 0;
    close(fd);
    if (written) rename(part, path);
}

/* A user as the container runtime takes it: "name", "uid", "name:group" or "uid:gid", looked
 * up in the image's /etc/passwd and /etc/group (a static program has no other way to them). */
struct identity {
    uid_t uid;
    gid_t gid;
    gid_t groups[64];
    int group_count;
    char home[PATH_MAX];
};

static bool numeric(const char *s, unsigned long *value) {
    char *end;
    if (!*s) return false;
    *value = strtoul(s, &end, 10);
    return *end == '\0';
}

/* The fields of the line of FILE whose field KEY_FIELD is KEY; false when there is none. */
static bool lookup(const char *file, int key_field, const char *key, char fields[7][256]) {
    FILE *f = fopen(file, "re");
    if (!f) return false;
    char line[1024];
    bool found = false;
    while (!found && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = '\0';
        char *rest = line;
        int n = 0;
        for (; n < 7 && rest; n++) {
            char *colon = strchr(rest, ':');
            if (colon) *colon = '\0';
            size_t len = strnlen(rest, 255);
            memcpy(fields[n], rest, len);
            fields[n][len] = '\0';
            rest = colon ? colon + 1 : NULL;
        }
        for (; n < 7; n++) fields[n][0] = '\0';
        found = !strcmp(fields[key_field], key);
    }
    fclose(f);
    return found;
}

static bool resolve_user(const char *spec, struct identity *who, char *why, size_t n) {
    char user[256], group[256] = "";
    snprintf(user, sizeof user, "%s", spec);
    char *colon = strchr(user, ':');
    if (colon) {
        *colon = '\0';
        snprintf(group, sizeof group, "%s", colon + 1);
    }
    char pw[7][256];
    unsigned long value;
    bool known = lookup("/etc/passwd", numeric(user, &value) ? 2 : 0, user, pw);
    if (!known && !numeric(user, &value)) {
        snprintf(why, n, "no user %s in the image's /etc/passwd", user);
        return false;
    }
    who->uid = known ? (uid_t)strtoul(pw[2], NULL, 10) : (uid_t)value;
    who->gid = known ? (gid_t)strtoul(pw[3], NULL, 10) : 0;
    snprintf(who->home, sizeof who->home, "%s", known && pw[5][0] ? pw[5] : "/");
    who->group_count = 0;
    char gr[7][256];
    if (group[0]) {
        bool found = lookup("/etc/group", numeric(group, &value) ? 2 : 0, group, gr);
        if (!found && !numeric(group, &value)) {
            snprintf(why, n, "no group %s in the image's /etc/group", group);
            return false;
        }
        who->gid = found ? (gid_t)strtoul(gr[2], NULL, 10) : (gid_t)value;
    }
    FILE *f = known ? fopen("/etc/group", "re") : NULL;  /* its other groups, as a runtime adds */
    char line[4096];
    while (f && fgets(line, sizeof line, f) && who->group_count < 64) {
        line[strcspn(line, "\n")] = '\0';
        char *name = line, *gid = NULL, *members = NULL;
        char *p = strchr(line, ':');
        if (p) { *p = '\0'; p = strchr(p + 1, ':'); }
        if (p) { gid = p + 1; p = strchr(gid, ':'); }
        if (p) { *p = '\0'; members = p + 1; }
        (void)name;
        for (char *m = members ? strtok(members, ",") : NULL; m; m = strtok(NULL, ","))
            if (!strcmp(m, pw[0]) && gid) who->groups[who->group_count++] = (gid_t)strtoul(gid, NULL, 10);
    }
    if (f) fclose(f);
    return true;
}

static int run_exec(int argc, char **argv) {
    const char *out = NULL, *user = NULL;
    bool set_home = false;
    size_t limit = 1 << 20;
    uint64_t log_limit = 0, logged = 0;  /* 0: no limit to watch */
    bool logging = true;
    int first = argc;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--out") && i + 1 < argc) out = argv[++i];
        else if (!strcmp(argv[i], "--limit") && i + 1 < argc)
            limit = (size_t)strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--log-limit") && i + 1 < argc)
            log_limit = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--user") && i + 1 < argc) user = argv[++i];
        else if (!strcmp(argv[i], "--set-home")) set_home = true;
        else if (!strcmp(argv[i], "--")) { first = i + 1; break; }
        else fatal("unknown argument %s", argv[i]);
    }
    if (first >= argc) fatal("exec: no command to run");
    if (limit > MAX_LIMIT) limit = MAX_LIMIT;
    struct identity who = {.uid = geteuid(), .gid = getegid(), .home = "/"};
    char why[300];
    if (user && *user && !resolve_user(user, &who, why, sizeof why)) {
        dprintf(STDERR_FILENO, "agentainer-runner: %s\n", why);
        return 126;
    }
    struct kept_file files[2] = {{.fd = -1, .limit = limit}, {.fd = -1, .limit = limit, .tail = true}};
    /* Root's, where the command (run as its own user) cannot reach it. */
    if (out && (mkdir(out, geteuid() == 0 ? 0700 : 0755) == 0 || errno == EEXIST)) {
        const char *names[2] = {"stdout", "stderr"};
        for (int i = 0; i < 2; i++) {
            char path[PATH_MAX];
            snprintf(path, sizeof path, "%s/%s", out, names[i]);
            files[i].path = xstrdup(path);
            files[i].fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        }
    }
    int pipes[2][2];
    if (pipe2(pipes[0], O_CLOEXEC) < 0 || pipe2(pipes[1], O_CLOEXEC) < 0)
        fatal("exec: pipes: %s", strerror(errno));
    exec_child = fork();
    if (exec_child < 0) fatal("exec: fork: %s", strerror(errno));
    if (exec_child == 0) {
        dup2(pipes[0][1], STDOUT_FILENO);
        dup2(pipes[1][1], STDERR_FILENO);
        if (geteuid() == 0 && who.uid != 0) {
            if (setgroups((size_t)who.group_count, who.groups) < 0 ||
                setresgid(who.gid, who.gid, who.gid) < 0 ||
                setresuid(who.uid, who.uid, who.uid) < 0)
                child_fail(126, "becoming user", user);
        } else if (geteuid() == 0 && (setgroups((size_t)who.group_count, who.groups) < 0 ||
                                      setresgid(who.gid, who.gid, who.gid) < 0)) {
            child_fail(126, "setting the group of", user);
        }
        if (set_home) setenv("HOME", who.home, 1);
        execvp(argv[first], argv + first);
        child_fail(errno == ENOENT ? 127 : 126, "exec", argv[first]);
    }
    close(pipes[0][1]);
    close(pipes[1][1]);
    int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    for (size_t i = 0; i < sizeof forwarded / sizeof *forwarded; i++)
        signal(forwarded[i], forward_signal);
    signal(SIGPIPE, SIG_IGN);
    int fds[2] = {pipes[0][0], pipes[1][0]};
    int status = 0;
    bool exited = false;
    int64_t quiet_since = 0;
    char buffer[CHUNK];
    while (fds[0] >= 0 || fds[1] >= 0) {
        struct pollfd p[2] = {{.fd = fds[0], .events = POLLIN}, {.fd = fds[1], .events = POLLIN}};
        int ready = poll(p, 2, 100);
        if (!exited && waitpid(exec_child, &status, WNOHANG) == exec_child) {
            exited = true;
            quiet_since = now_us();
        }
        if (ready <= 0) {
            /* The command ended but something it left holds its output open: stop waiting. */
            if (exited && now_us() - quiet_since > 200000) break;
            continue;
        }
        for (int i = 0; i < 2; i++) {
            if (fds[i] < 0 || !p[i].revents) continue;
            ssize_t n = read(fds[i], buffer, sizeof buffer);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                close(fds[i]);
                fds[i] = -1;
                continue;
            }
            uint64_t cost = log_limit && logging ? logged_bound(buffer, (size_t)n) : 0;
            if (logging && log_limit && logged + cost + LOG_ROOM > log_limit) {
                logging = false;
                dprintf(STDERR_FILENO, "\n%s\n", LOG_FULL);
            }
            if (logging) write_all(i == 0 ? STDOUT_FILENO : STDERR_FILENO, buffer, (size_t)n);
            logged += cost;
            keep_in_file(&files[i], buffer, (size_t)n);
            quiet_since = now_us();
        }
    }
    while (!exited) {
        if (waitpid(exec_child, &status, 0) == exec_child) exited = true;
        else if (errno != EINTR) break;
    }
    for (int i = 0; i < 2; i++) {
        if (files[i].fd < 0) continue;
        if (files[i].truncated) {  /* said by a file beside it, empty */
            char marker[PATH_MAX];
            snprintf(marker, sizeof marker, "%s-truncated", files[i].path);
            close(open(marker, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
        }
        close(files[i].fd);
    }
    int code = WIFEXITED(status) ? WEXITSTATUS(status)
             : WIFSIGNALED(status) ? 128 + WTERMSIG(status) : 255;
    if (out) keep_exit_code(out, code, first_signal);
    return code;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "version")) {
        puts(PROTOCOL);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "install")) return install(argv[2]);
    if (argc == 3 && !strcmp(argv[1], "workspace")) {
        if (chmod(argv[2], 01777) < 0) fatal("preparing %s: %s", argv[2], strerror(errno));
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "exec")) return run_exec(argc, argv);
    if (argc < 2 || strcmp(argv[1], "serve")) {
        fprintf(stderr, "usage: %s serve [--uid N] [--gid N] | exec --out DIR --limit N -- "
                "COMMAND... | install PATH | workspace DIR | version\n", argv[0]);
        return 2;
    }
    long uid = 65532, gid = -1;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--uid") && i + 1 < argc) uid = number(argv[++i], "--uid");
        else if (!strcmp(argv[i], "--gid") && i + 1 < argc) gid = number(argv[++i], "--gid");
        else fatal("unknown argument %s", argv[i]);
    }
    if (getpid() != 1)
        fatal("must be the agent's first process (PID 1) to end every process of a task");
    /* No task may open this process's /proc entries (its descriptors: the channel) or trace it. */
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0) fatal("prctl: %s", strerror(errno));
    if (geteuid() != 0) {
        mode = MODE_SHARED;  /* it may not switch users: tasks run as the runner's own user */
        task_uid = geteuid();
        task_gid = getegid();
    } else {
        task_uid = (uid_t)uid;
        task_gid = (gid_t)(gid >= 0 ? gid : uid);
        mode = task_uid == 0 ? MODE_ROOT : MODE_USER;
    }
    sigset_t handled;
    sigemptyset(&handled);
    int caught[] = {SIGCHLD, SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM};
    for (size_t i = 0; i < sizeof caught / sizeof *caught; i++) sigaddset(&handled, caught[i]);
    sigprocmask(SIG_BLOCK, &handled, NULL);
    signal_fd = signalfd(-1, &handled, SFD_NONBLOCK | SFD_CLOEXEC);
    if (signal_fd < 0) fatal("signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);
    fcntl(STDIN_FILENO, F_SETFD, FD_CLOEXEC);
    fcntl(STDOUT_FILENO, F_SETFD, FD_CLOEXEC);
    fcntl(STDERR_FILENO, F_SETFD, FD_CLOEXEC);
    extern char **environ;
    for (char **e = environ; *e; e++) {
        if (strncmp(*e, "HOME=", 5)) {
            base_env = xrealloc(base_env, (base_env_count + 1) * sizeof *base_env);
            base_env[base_env_count++] = xstrdup(*e);
        }
    }
    if (mkdir(TASKS_DIR, 0711) < 0 && errno != EEXIST)
        fatal("making %s: %s", TASKS_DIR, strerror(errno));
    if (mode != MODE_SHARED && chmod(TASKS_DIR, 0711) < 0)
        fatal("protecting %s: %s", TASKS_DIR, strerror(errno));
    take_start_state();
    serve();
    return 0;
}
