"""python -m kbloop: run an unmodified asyncio program on kbloop, or report what is usable.

    python -m kbloop info [--json]
    python -m kbloop [--backend io_uring] script.py [args...]
    python -m kbloop [--backend io_uring] -m package.module [args...]
    python -m kbloop -m uvicorn --port 8000 app:app   # uvicorn's --loop auto: kbloop
    python -m kbloop --version
    python -m kbloop --workers N [--busy-poll] script.py [args...]   # one loop per core
    python -m kbloop --stats script.py     # each loop prints its counters when it closes
    python -m kbloop --backend dpdk --dpdk-vdev net_af_xdp0,iface=eth1 --ip 10.0.0.2/24 \
        server.py                          # TCP on a user-space stack (docs/dpdk.md)
    python -m kbloop --backend rdma [--rdma-poll sleep] server.py
                                           # streams over RDMA queue pairs (docs/rdma.md)

kbloop's options go before the program: everything from the script or -m module on is the
program's command line, passed on untouched.
"""
import argparse
import json
import os
import runpy
import sys

import kbloop


def _print_info(as_json):
    data = kbloop.info()
    if as_json:
        print(json.dumps(data, indent=2))
        return
    u = data['io_uring']
    print(f"kbloop {data['kbloop']} on Python {data['python']}, kernel {data['kernel']}")
    print(f"io_uring usable: {'yes' if u['usable'] else 'no'}")
    if not u['usable']:
        print(f"  why not: {u['reason']}")
        print("  kbloop.new_event_loop() falls back to asyncio's loop (with a warning)")
    else:
        print(f"  ring set-up: {', '.join(u['setup_flags'])}")
        print(f"  features in use: {', '.join(u['features'])}")
        missing = [k for k, v in u['opcodes'].items() if not v]
        print(f"  opcodes missing: {', '.join(missing) or 'none'}")
    print(f"default backend: {data['default_backend']}")


def _split_argv(parser, argv):
    """(kbloop's options, the program's command line): the program's starts at the script or
    at -m module (or after --), and is passed on untouched, its options included."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == '--':
            return argv[:i], argv[i + 1:]
        if not arg.startswith('-') or arg == '-' or (arg.startswith('-m') and arg != '-m'
                                                      and not arg.startswith('--')):
            return argv[:i], argv[i:]
        if arg == '-m':
            return argv[:i], argv[i:]
        action = parser._option_string_actions.get(arg.partition('=')[0])
        if action is not None and action.nargs != 0 and '=' not in arg:
            i += 1      # the option's value
        i += 1
    return argv, []


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['info']:
        _print_info('--json' in argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog='python -m kbloop', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument('--backend', choices=kbloop.BACKENDS, default=None)
    parser.add_argument('--workers', type=int, default=None,
                        help='run N worker processes sharing the port (SO_REUSEPORT), each '
                             'with its own loop pinned to its own core')
    parser.add_argument('--busy-poll', action='store_true',
                        help='busy-poll reactor (KBLOOP_BUSY_POLL=1); see docs/modes.md')
    parser.add_argument('--sqpoll', action='store_true', help='SQPOLL ring (KBLOOP_SQPOLL=1)')
    parser.add_argument('--stats', action='store_true',
                        help="print each loop's counters to stderr when it closes (KBLOOP_STATS=1)")
    dpdk = parser.add_argument_group('the DPDK datapath (--backend dpdk; docs/dpdk.md)')
    dpdk.add_argument('--ip', help="the stack's IPv4 address and prefix, e.g. 10.0.0.2/24 "
                                   '(KBLOOP_DPDK_IP)')
    dpdk.add_argument('--gateway', help='next hop for other networks (KBLOOP_DPDK_GATEWAY)')
    dpdk.add_argument('--dpdk-vdev', help='a DPDK virtual device, e.g. net_af_xdp0,iface=eth1 '
                                          '(KBLOOP_DPDK_VDEV)')
    dpdk.add_argument('--dpdk-args', help="the EAL's arguments as one shell-quoted string, for "
                                          'a real NIC (KBLOOP_DPDK_ARGS)')
    dpdk.add_argument('--dpdk-port', type=int, help='the DPDK port id (KBLOOP_DPDK_PORT)')
    rdma = parser.add_argument_group('the RDMA datapath (--backend rdma; docs/rdma.md)')
    rdma.add_argument('--rdma-poll', choices=('busy', 'sleep'),
                      help='spin on the completion queues, or sleep until a completion '
                           '(KBLOOP_RDMA_POLL; busy by default)')
    parser.add_argument('--version', action='version',
                        version=f'kbloop {kbloop.__version__} (Python {sys.version.split()[0]})')
    parser.add_argument('-m', dest='module', metavar='module',
                        help='run a library module as a script; what follows goes to it')
    parser.add_argument('script', nargs='?',
                        help='the program to run; everything after it goes to it, untouched')
    own, program = _split_argv(parser, argv)
    opts = parser.parse_args(own)
    if program[:1] == ['-m']:
        if len(program) < 2:
            parser.error('argument -m: expected one argument')
        opts.module, opts.args = program[1], program[2:]
    elif program[:1] and program[0].startswith('-m'):
        opts.module, opts.args = program[0][2:], program[1:]
    elif program:
        opts.script, opts.args = program[0], program[1:]
    else:
        opts.args = []
    if opts.module is None and opts.script is None:
        parser.error('give a script, -m module, or "info"')
    if opts.backend:
        os.environ['KBLOOP_BACKEND'] = opts.backend
    if opts.busy_poll:
        os.environ['KBLOOP_BUSY_POLL'] = '1'
    for value, env in ((opts.ip, 'KBLOOP_DPDK_IP'), (opts.gateway, 'KBLOOP_DPDK_GATEWAY'),
                       (opts.dpdk_vdev, 'KBLOOP_DPDK_VDEV'), (opts.dpdk_args, 'KBLOOP_DPDK_ARGS'),
                       (opts.dpdk_port, 'KBLOOP_DPDK_PORT'), (opts.rdma_poll, 'KBLOOP_RDMA_POLL')):
        if value is not None:
            os.environ[env] = str(value)
    if opts.backend == 'dpdk' and not os.environ.get('KBLOOP_DPDK_IP'):
        parser.error('--backend dpdk needs --ip (the stack\'s address, e.g. 10.0.0.2/24)')
    if opts.sqpoll:
        os.environ['KBLOOP_SQPOLL'] = '1'
    if opts.stats:
        os.environ['KBLOOP_STATS'] = '1'
    if opts.workers is not None:
        from kbloop.workers import run_command
        # each worker runs this same command line, minus --workers
        target = (['-m', opts.module] if opts.module else []) + (
            [opts.script] if opts.script else []) + opts.args
        return run_command([sys.executable, '-m', 'kbloop'] + target, opts.workers)
    # asyncio.run()/new_event_loop() in the program now create kbloop loops.
    import asyncio
    asyncio.set_event_loop_policy(kbloop.EventLoopPolicy())
    # uvicorn's --loop auto (its default) would pick uvloop, which sets no policy: kbloop's.
    from kbloop._uvicorn import hook_uvicorn
    hook_uvicorn()
    if opts.module is not None:
        rest = ([opts.script] if opts.script else []) + opts.args
        sys.argv = [opts.module] + rest
        runpy.run_module(opts.module, run_name='__main__', alter_sys=True)
    else:
        sys.argv = [opts.script] + opts.args
        sys.path.insert(0, os.path.dirname(os.path.abspath(opts.script)))
        runpy.run_path(opts.script, run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main())
