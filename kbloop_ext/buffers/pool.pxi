# The zero-copy buffer pool: memory in large slabs, registered once with each datapath, lent
# out as refcounted kbloop.Buffer objects.
#
# Ownership is plain Python refcounting, so that memory can never be unmapped under a reader:
#   Buffer --> _Chunk --> _Slab (the mapping)        a Buffer slice shares its parent's _Chunk
#   BufferPool --> every live _Slab                   (so the pool can reuse free chunks)
# When the last Buffer over a chunk goes, the _Chunk returns its memory to where it came from:
# the pool's free list (alloc_buffer), or the datapath's receive ring (a zero-copy receive).
# A _Slab is unmapped only when the pool has dropped it and no chunk refers to it, so a Buffer
# the application keeps stays valid even after its loop is closed.

cdef extern from "<sys/mman.h>":
    void *c_mmap "mmap"(void *addr, size_t length, int prot, int flags, int fd, long offset) nogil
    int munmap(void *addr, size_t length) nogil
    int PROT_READ, PROT_WRITE, MAP_PRIVATE, MAP_ANONYMOUS, MAP_HUGETLB
    void *MAP_FAILED

cdef extern from "Python.h":
    int PyBuffer_FillInfo(Py_buffer *view, object obj, void *buf, Py_ssize_t len, int readonly,
                          int flags) except -1

cdef size_t SLAB_BYTES = 2 << 20          # one x86-64 hugepage
# Chunk sizes: a buffer takes the smallest class that fits; above the largest it gets a mapping
# of its own (a "large" slab of one chunk, unmapped as soon as it is free).
cdef tuple SIZE_CLASSES = (4096, 16384, 65536, 262144, 1 << 20, 2 << 20)
cdef int NCLASSES = 6
cdef int MAX_SLAB_INDEX = 1024            # slab index = io_uring fixed-buffer slot

cdef enum ChunkHome:
    CHUNK_POOL = 0       # returns to the pool's free list
    CHUNK_RECV = 1       # returns to the datapath's receive buffer ring


cdef class _Slab:
    """One mapping: chunk_size-byte chunks, a stack of the free ones, a registration index."""
    cdef:
        char *base
        size_t size, chunk_size
        bint hugepage
        int index               # slot in the pool's table (= fixed buffer index), -1: none
        int size_class          # index in SIZE_CLASSES, -1 for a large or receive-ring slab
        uint32_t *free
        uint32_t nfree, nchunks

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)
        PyMem_Free(self.free)

    cdef int _map(self, size_t size, bint try_huge) except -1:
        cdef void *p = MAP_FAILED
        if try_huge and size % SLAB_BYTES == 0:
            p = c_mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB,
                     -1, 0)
            self.hugepage = p != MAP_FAILED
        if p == MAP_FAILED:     # no hugepages reserved (the usual case): page-aligned memory
            p = c_mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if p == MAP_FAILED:
            raise MemoryError(f'kbloop buffer pool: mmap of {size} bytes failed')
        self.base = <char *>p
        self.size = size
        return 0


cdef class _Chunk:
    """A piece of a slab lent out, or a device's receive buffer (slab None: DPDK's mbufs);
    gives it back when the last Buffer over it is gone."""
    cdef:
        _Slab slab
        object home             # BufferPool (CHUNK_POOL) or the Datapath (CHUNK_RECV)
        ChunkHome kind
        uint32_t number         # chunk number in the slab (= buffer id in the receive ring)
        uintptr_t token         # CHUNK_RECV: the device's own handle (DPDK: the pbuf)
        object holder           # CHUNK_RECV: the transport (or socket) whose receive filled it

    def __dealloc__(self):
        if self.home is None:
            return
        if self.kind == CHUNK_POOL:
            (<BufferPool>self.home)._put(self.slab, self.number)
        else:
            (<Datapath>self.home).recv_buffer_returned(self.number, self.token, self.holder)


cdef Buffer _new_buffer(_Chunk chunk, char *ptr, Py_ssize_t length):
    cdef Buffer b = Buffer.__new__(Buffer)
    b._chunk = chunk
    b._ptr = ptr
    b._len = length
    return b


cdef class Buffer:
    """Memory from kbloop's zero-copy pool, with the buffer protocol (memoryview, bytes(...),
    file.write, socket.send, hashlib...).

    From `loop.alloc_buffer(n)` (writable: fill it, then `transport.write(buf)` sends it without
    a copy) or from `ZeroCopyProtocol.buffer_received(buf)` (the memory the kernel received
    into).  The application may keep a Buffer as long as it likes; the memory goes back to the
    pool when the last reference (including slices and memoryviews) is gone, or at release().
    Slicing (buf[a:b]) makes a new Buffer over the same memory, without copying.
    A Buffer handed to write() becomes read-only: the kernel may still be reading it.
    """
    cdef:
        _Chunk _chunk
        char *_ptr
        Py_ssize_t _len
        bint _readonly
        Py_ssize_t _exports

    def __cinit__(self):
        self._ptr = NULL

    def __init__(self):
        raise TypeError('kbloop.Buffer objects come from loop.alloc_buffer(n) or a '
                        'ZeroCopyProtocol; they cannot be created directly')

    def __getbuffer__(self, Py_buffer *view, int flags):
        if self._chunk is None:
            raise ValueError('operation on a released kbloop.Buffer')
        if self._readonly and (flags & PyBUF_WRITABLE):
            raise BufferError('this kbloop.Buffer was written to a transport and is read-only')
        PyBuffer_FillInfo(view, self, self._ptr, self._len, self._readonly, flags)
        self._exports += 1

    def __releasebuffer__(self, Py_buffer *view):
        self._exports -= 1

    def __len__(self):
        return self._len

    @property
    def nbytes(self):
        return self._len

    @property
    def readonly(self):
        return self._readonly

    @property
    def released(self):
        return self._chunk is None

    def __getitem__(self, key):
        cdef Py_ssize_t start, stop, step
        if self._chunk is None:
            raise ValueError('operation on a released kbloop.Buffer')
        if isinstance(key, slice):
            start, stop, step = key.indices(self._len)
            if step != 1:
                return memoryview(self)[key].tobytes()
            if stop < start:
                stop = start
            b = _new_buffer(self._chunk, self._ptr + start, stop - start)
            b._readonly = self._readonly
            return b
        return memoryview(self)[key]

    def tobytes(self):
        if self._chunk is None:
            raise ValueError('operation on a released kbloop.Buffer')
        return PyBytes_FromStringAndSize(self._ptr, self._len)

    def release(self):
        """Give the memory back now (when no other Buffer or memoryview shares it)."""
        if self._exports:
            raise BufferError(f'kbloop.Buffer has {self._exports} exported memoryview(s): '
                              f'release them first')
        self._chunk = None
        self._ptr = NULL
        self._len = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    cdef _freeze(self):
        self._readonly = True

    def __repr__(self):
        if self._chunk is None:
            return '<kbloop.Buffer released>'
        kind = 'recv' if self._chunk.kind == CHUNK_RECV else 'pool'
        return f'<kbloop.Buffer {self._len} bytes ({kind}){" read-only" if self._readonly else ""}>'


cdef class BufferPool:
    """Slabs of registered memory, split into size classes; one pool per loop."""
    cdef:
        readonly size_t limit
        readonly bint hugepages        # try MAP_HUGETLB first
        size_t mapped
        list _table                    # index -> _Slab (None: free slot)
        list _avail                    # per size class: slabs that have a free chunk
        list _datapaths                # datapaths the slabs are registered with
        uint64_t n_allocs, n_frees, n_huge_slabs, n_slabs_created
        Py_ssize_t in_use_bytes, in_use_chunks

    def __init__(self, size_t limit=1 << 30, bint hugepages=True):
        if limit < SLAB_BYTES:
            raise ValueError(f'buffer pool limit must be at least {SLAB_BYTES} bytes, got {limit}')
        self.limit = limit
        self.hugepages = hugepages
        self._table = []
        self._avail = [[] for _ in range(NCLASSES)]
        self._datapaths = []

    # -- slabs ------------------------------------------------------------------------------
    cdef _Slab _new_slab(self, size_t size, size_t chunk_size, int size_class, bint register):
        cdef _Slab slab
        cdef uint32_t i
        if self.mapped + size > self.limit:
            raise MemoryError(f'kbloop buffer pool limit reached ({self.mapped} of {self.limit} '
                              f'bytes in use; raise it with Loop(pool_limit_mb=...) or '
                              f'KBLOOP_POOL_LIMIT_MB)')
        slab = _Slab.__new__(_Slab)
        slab._map(size, self.hugepages)
        slab.chunk_size = chunk_size
        slab.size_class = size_class
        slab.nchunks = <uint32_t>(size // chunk_size)
        slab.index = -1
        self.mapped += size
        self.n_slabs_created += 1
        self.n_huge_slabs += slab.hugepage
        if register:
            slab.free = <uint32_t *>PyMem_Malloc(slab.nchunks * sizeof(uint32_t))
            if slab.free == NULL:
                raise MemoryError()
            for i in range(slab.nchunks):
                slab.free[i] = slab.nchunks - 1 - i
            slab.nfree = slab.nchunks
            self._insert(slab)
        return slab

    cdef _insert(self, _Slab slab):
        cdef Py_ssize_t i
        cdef Datapath dp
        for i in range(len(self._table)):
            if self._table[i] is None:
                break
        else:
            i = len(self._table)
            if i >= MAX_SLAB_INDEX:
                return       # usable, but not registered: sent the ordinary way
            self._table.append(None)
        self._table[i] = slab
        slab.index = i
        for dp in self._datapaths:
            dp.register_slab(slab)

    cdef _remove(self, _Slab slab):
        cdef Datapath dp
        if slab.index >= 0:
            for dp in self._datapaths:
                dp.unregister_slab(slab)
            self._table[slab.index] = None
            slab.index = -1
        self.mapped -= slab.size

    cdef _Slab recv_region(self, unsigned nbufs, unsigned bufsize):
        """The memory of a datapath's receive buffer ring: owned by the ring, not lent by us."""
        return self._new_slab(<size_t>nbufs * bufsize, bufsize, -1, False)

    cdef release_region(self, _Slab region):
        """The datapath let go of its ring (it is unmapped once no Buffer shows it)."""
        self.mapped -= region.size

    cdef attach(self, Datapath dp):
        """Register every slab with dp, and the ones made later too."""
        cdef _Slab slab
        self._datapaths.append(dp)
        for slab in self._table:
            if slab is not None:
                dp.register_slab(slab)

    cdef detach(self, Datapath dp):
        if dp in self._datapaths:
            self._datapaths.remove(dp)

    # -- chunks -----------------------------------------------------------------------------
    cpdef Buffer alloc(self, Py_ssize_t n):
        cdef int c
        cdef _Slab slab
        cdef _Chunk chunk
        cdef list avail
        cdef size_t size
        if n <= 0:
            raise ValueError(f'buffer size must be positive, got {n}')
        for c in range(NCLASSES):
            if <size_t>n <= <size_t>SIZE_CLASSES[c]:
                break
        else:
            c = -1
        if c < 0:
            size = (<size_t>n + SLAB_BYTES - 1) // SLAB_BYTES * SLAB_BYTES
            slab = self._new_slab(size, size, -1, True)
        else:
            avail = self._avail[c]
            if avail:
                slab = avail[-1]
            else:
                slab = self._new_slab(SLAB_BYTES, SIZE_CLASSES[c], c, True)
                avail.append(slab)
        chunk = _Chunk.__new__(_Chunk)
        chunk.slab = slab
        slab.nfree -= 1
        chunk.number = slab.free[slab.nfree]
        if slab.nfree == 0 and c >= 0:
            self._avail[c].pop()
        chunk.home = self
        chunk.kind = CHUNK_POOL
        self.n_allocs += 1
        self.in_use_chunks += 1
        self.in_use_bytes += slab.chunk_size
        return _new_buffer(chunk, slab.base + <size_t>chunk.number * slab.chunk_size, n)

    cdef void _put(self, _Slab slab, uint32_t number) noexcept:
        slab.free[slab.nfree] = number
        slab.nfree += 1
        self.n_frees += 1
        self.in_use_chunks -= 1
        self.in_use_bytes -= slab.chunk_size
        try:
            if slab.size_class < 0:
                self._remove(slab)        # a large buffer's own mapping: unmap it now
            elif slab.nfree == 1:
                self._avail[slab.size_class].append(slab)
        except BaseException:
            pass    # only bookkeeping lists can fail here (MemoryError): the memory stays valid

    def trim(self):
        """Unmap the slabs that have no chunk in use; returns the bytes given back."""
        cdef _Slab slab
        cdef size_t before = self.mapped
        for c in range(NCLASSES):
            for slab in list(self._avail[c]):
                if slab.nfree == slab.nchunks:
                    self._avail[c].remove(slab)
                    self._remove(slab)
        return before - self.mapped

    def stats(self):
        cdef _Slab slab
        classes = {}
        for slab in self._table:
            if slab is None or slab.size_class < 0:
                continue
            cls = classes.setdefault(SIZE_CLASSES[slab.size_class], {'chunks': 0, 'free': 0})
            cls['chunks'] += slab.nchunks
            cls['free'] += slab.nfree
        return {
            'limit_bytes': self.limit,
            'mapped_bytes': self.mapped,
            'in_use_bytes': self.in_use_bytes,
            'in_use_buffers': self.in_use_chunks,
            'allocs': self.n_allocs,
            'frees': self.n_frees,
            'slabs': sum(s is not None for s in self._table),
            'slabs_created': self.n_slabs_created,
            'hugepage_slabs': self.n_huge_slabs,
            'classes': classes,
        }
