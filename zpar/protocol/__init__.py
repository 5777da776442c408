"""The zpar wire: every message kind, its header fields and its frame layout.

Nothing else in zpar builds or parses frames: other modules hand ``encode`` a
message and get the frames to send; ``decode`` gives them back a message with
each entry's payload frames attached. A message is a ZeroMQ multipart: one
msgpack header frame, then payload frames the broker forwards untouched::

    producer                broker                      agent            worker
       | HELLO ------------->  |                          |                 |
       | <----------- WELCOME  | <------------------ HELLO|                 |
       |                       | WELCOME ---------------> |                 |
       |                       | <----------- READY(n)    |   <------ HELLO |
       | SUBMIT(funcs,tasks) ->| TASKS(funcs,tasks) ----> | TASKS --------> |
       |                       | <- RESULT (collector) -- | <------- RESULT |
       | <-------------- RESULT|  ACK ------------------> |                 |
       | <--- ITEMS (streams)  | <- ITEMS (collector) --- | <-------- ITEMS |
       | FEED (sends, credits)>| FEED ------------------> | FEED ---------> |
       | STATUS ------------>  |                          |                 |
       | <------------ STATUS  | <-> HEARTBEAT            |                 |
       | BYE ----------------> | <------------------- BYE |                 |
       |                       | <------------- GIVE_BACK | <---- GIVE_BACK |
       | RELEASE ----------->  | RELEASE ---------------> | RELEASE ------> |
       | PART (big args) --->  | PART ------------------> | (joined) -----> |
       |                       | CONTROL (dashboard,      |                 |
       |                       |  Client.scale) --------> |                 |

Header: ``{"v": VERSION, "k": Kind, ...fields}``. SUBMIT and TASKS carry the
function blobs named in ``f`` first, then each task's frames in order (its
pickled arguments, then its out-of-band buffers). RESULT, ITEMS and FEED carry
each entry's frames in order. A payload of one small frame rides inside the
header instead (see INLINE_MAX), so a batch of tiny tasks is one frame on
every hop. A task's payload of PARTS_FROM bytes or more (several frames)
follows its entry as PART messages (``split``), each forwarded as it arrives
and joined (``Assembly``) by the agent before a worker gets it. A message
of the wrong version, kind, shape or frame count raises ProtocolError;
callers drop and count it. Refusals carry an ErrorCode, and a
lost task's cause travels as data (Cause): no peer acts on English text.
"""

from ._codec import batches, check_resource, chunks, decode, decode_routed, encode, encode_routed, payload_bytes, runs
from ._messages import (
    BATCH_MAX_BYTES,
    BATCH_MAX_TASKS,
    FLAG_CHANNEL,
    INLINE_MAX,
    MAX_DEPS,
    MAX_ENTRIES,
    MAX_ERROR_TEXT,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_SIZE,
    MAX_NAME,
    MAX_PRIORITY,
    MAX_REFS,
    MAX_RESOURCE_NAME,
    MAX_RESOURCES,
    MAX_RETRIES,
    MAX_TASK_FRAMES,
    MAX_WORKERS,
    MIN_PRIORITY,
    PART_BYTES,
    PARTS_FROM,
    STREAM_BYTES,
    STREAM_WINDOW,
    VALUE_STATUSES,
    VERSION,
    Ack,
    Action,
    Bye,
    ByeReason,
    Cancel,
    Cause,
    Control,
    Credit,
    Error,
    ErrorCode,
    Feed,
    Frame,
    Function,
    GiveBack,
    Heartbeat,
    Hello,
    ItemEntry,
    Items,
    Kind,
    Message,
    NodeStats,
    Part,
    Payload,
    Ready,
    Release,
    Result,
    ResultEntry,
    Role,
    Sched,
    Shipped,
    Status,
    StatusMsg,
    Submit,
    TaskEntry,
    Tasks,
    Welcome,
    WorkerStats,
    digest,
    waiting_for,
)
from ._parts import Assembly, split

__all__ = [
    "BATCH_MAX_BYTES",
    "BATCH_MAX_TASKS",
    "FLAG_CHANNEL",
    "INLINE_MAX",
    "MAX_DEPS",
    "MAX_ENTRIES",
    "MAX_ERROR_TEXT",
    "MAX_FRAMES",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_SIZE",
    "MAX_NAME",
    "MAX_PRIORITY",
    "MAX_REFS",
    "MAX_RESOURCES",
    "MAX_RESOURCE_NAME",
    "MAX_RETRIES",
    "MAX_TASK_FRAMES",
    "MAX_WORKERS",
    "MIN_PRIORITY",
    "PARTS_FROM",
    "PART_BYTES",
    "STREAM_BYTES",
    "STREAM_WINDOW",
    "VALUE_STATUSES",
    "VERSION",
    "Ack",
    "Action",
    "Assembly",
    "Bye",
    "ByeReason",
    "Cancel",
    "Cause",
    "Control",
    "Credit",
    "Error",
    "ErrorCode",
    "Feed",
    "Frame",
    "Function",
    "GiveBack",
    "Heartbeat",
    "Hello",
    "ItemEntry",
    "Items",
    "Kind",
    "Message",
    "NodeStats",
    "Part",
    "Payload",
    "Ready",
    "Release",
    "Result",
    "ResultEntry",
    "Role",
    "Sched",
    "Shipped",
    "Status",
    "StatusMsg",
    "Submit",
    "TaskEntry",
    "Tasks",
    "Welcome",
    "WorkerStats",
    "batches",
    "check_resource",
    "chunks",
    "decode",
    "decode_routed",
    "digest",
    "encode",
    "encode_routed",
    "payload_bytes",
    "runs",
    "split",
    "waiting_for",
]
