//! Process managers that turn events into actions (issue 4). Nothing here
//! yet.
